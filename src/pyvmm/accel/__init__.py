"""CPU accelerators: ``kvm`` (hardware virtualization) and ``tcg`` (unicorn)."""
