"""The x86 platform floor: the PC's fixed address map, firmware tables and boot CPU state.

Everything here is plain data and encoders: the address map (:mod:`.layout`),
E820 (:mod:`.e820`), the MP table (:mod:`.mptable`), ACPI (:mod:`.aml`,
:mod:`.acpi`), boot page tables and GDT (:mod:`.boot_tables`) and the CPUID
model (:mod:`.cpuid`).  Nothing on this floor imports devices, accelerators,
boot loaders or the machine builder; they all import it.
"""
