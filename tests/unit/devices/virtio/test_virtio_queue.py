"""Split virtqueue walking: chains, indirect tables, hostile rings, EVENT_IDX and suppression."""

from __future__ import annotations

import struct

import pytest
from test_virtio_helpers import DESC_INDIRECT, DESC_NEXT, DESC_WRITE, Alloc, DriverQueue

from pyvmm.devices.virtio.queue import Virtqueue, VirtqueueError, need_event
from pyvmm.memory import GuestMemory

SIZE = 8


@pytest.fixture
def env():
    mem = GuestMemory(4 << 20)
    alloc = Alloc(0x10000)
    dq = DriverQueue(mem, alloc, 0, SIZE)
    vq = Virtqueue(mem, 0, 16)
    vq.size = SIZE
    vq.desc_addr, vq.avail_addr, vq.used_addr = dq.desc, dq.avail, dq.used
    yield mem, alloc, dq, vq
    mem.close()


def activate(vq, event_idx=False, indirect=True):
    vq.activate(event_idx, indirect)


def test_simple_chain_readable_then_writable(env):
    mem, alloc, dq, vq = env
    activate(vq)
    a, b, c = alloc(100), alloc(200), alloc(1)
    mem.write(a, b"x" * 100)
    head = dq.add([(a, 100, False), (b, 200, False), (c, 1, True)])
    chain = vq.pop()
    assert chain is not None and chain.head == head
    assert chain.read_len == 300 and chain.write_len == 1
    assert bytes(chain.readable[0]) == b"x" * 100
    chain.writable[0][0] = 0x55
    assert mem.read_u8(c) == 0x55
    chain.release()
    assert vq.pop() is None
    vq.push(head, 1)
    assert dq.get_used() == [(head, 1)]


def test_indirect_table(env):
    mem, alloc, dq, vq = env
    activate(vq)
    table = alloc(16 * 3)
    bufs = [(alloc(16), 16, False), (alloc(512), 512, True), (alloc(1), 1, True)]
    head = dq.add_indirect(table, bufs)
    chain = vq.pop()
    assert chain.head == head and chain.read_len == 16 and chain.write_len == 513


def test_indirect_without_feature_is_an_error(env):
    _mem, alloc, dq, vq = env
    activate(vq, indirect=False)
    dq.add_indirect(alloc(16), [(alloc(16), 16, False)])
    with pytest.raises(VirtqueueError, match="INDIRECT_DESC"):
        vq.pop()


def test_nested_indirect_rejected(env):
    mem, alloc, dq, vq = env
    activate(vq)
    inner = alloc(16)
    mem.write(inner, struct.pack("<QIHH", alloc(16), 16, 0, 0))
    outer = alloc(16)
    mem.write(outer, struct.pack("<QIHH", inner, 16, DESC_INDIRECT, 0))
    head = dq.free.pop(0)
    dq.write_desc(head, outer, 16, DESC_INDIRECT, 0)
    dq.publish(head)
    with pytest.raises(VirtqueueError, match="nested"):
        vq.pop()


@pytest.mark.parametrize("length", [0, 15, 17])
def test_indirect_bad_length(env, length):
    _mem, alloc, dq, vq = env
    activate(vq)
    head = dq.free.pop(0)
    dq.write_desc(head, alloc(64), length, DESC_INDIRECT, 0)
    dq.publish(head)
    with pytest.raises(VirtqueueError):
        vq.pop()


def test_indirect_loop_bounded_by_table_length(env):
    mem, alloc, dq, vq = env
    activate(vq)
    table = alloc(32)
    buf = alloc(8)
    mem.write(table, struct.pack("<QIHH", buf, 8, DESC_NEXT, 1))
    mem.write(table + 16, struct.pack("<QIHH", buf, 8, DESC_NEXT, 0))  # 1 -> 0 -> 1 ...
    head = dq.free.pop(0)
    dq.write_desc(head, table, 32, DESC_INDIRECT, 0)
    dq.publish(head)
    with pytest.raises(VirtqueueError, match="longer"):
        vq.pop()


def test_loop_in_chain_terminates(env):
    _mem, alloc, dq, vq = env
    activate(vq)
    buf = alloc(8)
    dq.write_desc(0, buf, 8, DESC_NEXT, 1)
    dq.write_desc(1, buf, 8, DESC_NEXT, 0)
    dq.publish(0)
    with pytest.raises(VirtqueueError, match="loop"):
        vq.pop()


def test_next_index_out_of_range(env):
    _mem, alloc, dq, vq = env
    activate(vq)
    dq.write_desc(0, alloc(8), 8, DESC_NEXT, SIZE)
    dq.publish(0)
    with pytest.raises(VirtqueueError, match="next index"):
        vq.pop()


def test_head_index_out_of_range(env):
    _mem, _alloc, dq, vq = env
    activate(vq)
    dq.publish(SIZE + 3)
    with pytest.raises(VirtqueueError, match="head index"):
        vq.pop()


def test_avail_idx_too_far_ahead(env):
    mem, _alloc, dq, vq = env
    activate(vq)
    mem.write_u16(dq.avail + 2, SIZE + 1)
    with pytest.raises(VirtqueueError, match="ahead"):
        vq.pop()


def test_buffer_outside_ram(env):
    _mem, alloc, dq, vq = env
    activate(vq)
    dq.add([(alloc(8), 8, False), ((4 << 20) - 4, 8, True)])
    with pytest.raises(VirtqueueError, match="outside guest RAM"):
        vq.pop()


def test_readable_after_writable_rejected(env):
    _mem, alloc, dq, vq = env
    activate(vq)
    dq.add([(alloc(8), 8, True), (alloc(8), 8, False)])
    with pytest.raises(VirtqueueError, match="readable descriptor after"):
        vq.pop()


def test_chain_length_cap(env):
    mem, alloc, dq, vq = env
    vq.max_chain_bytes = 1 << 20
    activate(vq)
    big = alloc(1 << 20)
    dq.add([(big, 1 << 20, False), (alloc(1), 1, True)])
    with pytest.raises(VirtqueueError, match="more than"):
        vq.pop()


def test_validate_rejects_bad_rings(env):
    _mem, _alloc, _dq, vq = env
    vq.desc_addr = 0x10008
    with pytest.raises(VirtqueueError, match="aligned"):
        vq.validate()
    vq.desc_addr = 0x10000
    vq.used_addr = (4 << 20) - 8
    with pytest.raises(VirtqueueError, match="outside"):
        vq.validate()
    vq.used_addr = 0x20000
    vq.size = 12
    with pytest.raises(VirtqueueError, match="power of two"):
        vq.validate()
    vq.size = 32  # larger than max_size 16
    with pytest.raises(VirtqueueError):
        vq.validate()


def test_wraparound_of_indices(env):
    mem, alloc, dq, vq = env
    activate(vq)
    buf = alloc(4)
    # start both sides near 0xffff so the 16-bit indices wrap
    dq.avail_idx = vq.last_avail_idx = 0xFFFE
    mem.write_u16(dq.avail + 2, 0xFFFE)
    vq.used_idx = dq.last_used = 0xFFFE
    for _ in range(4):
        head = dq.add([(buf, 4, True)])
        chain = vq.pop()
        assert chain.head == head
        vq.push(head, 4)
        dq.free.append(head)
        assert dq.get_used() == [(head, 4)]
    assert vq.last_avail_idx == 2 and vq.used_idx == 2


def test_need_event_formula():
    assert need_event(0, 1, 0)
    assert not need_event(5, 3, 2)
    assert need_event(5, 6, 2)
    assert need_event(0xFFFF, 0, 0xFFFE)  # wraps


def test_event_idx_used_event_suppresses_interrupts(env):
    mem, alloc, dq, vq = env
    activate(vq, event_idx=True)
    buf = alloc(4)
    dq.set_used_event(0)
    results = []
    for _ in range(4):
        head = dq.add([(buf, 4, True)])
        vq.pop()
        vq.push(head, 4)
        dq.free.append(head)
        results.append(vq.should_notify())
    # the first push always signals; after that only the one crossing used_event (index 0 -> 1)
    assert results == [True, False, False, False]
    dq.set_used_event(5)  # driver: "interrupt me when entry 5 is used"
    notes = []
    for _ in range(3):
        head = dq.add([(buf, 4, True)])
        vq.pop()
        vq.push(head, 4)
        dq.free.append(head)
        notes.append(vq.should_notify())
    assert vq.used_idx == 7 and notes == [False, True, False]  # 5->6 crosses used_event 5


def test_event_idx_avail_event_written_on_pop(env):
    mem, alloc, dq, vq = env
    activate(vq, event_idx=True)
    buf = alloc(4)
    dq.add([(buf, 4, True)])
    dq.add([(buf, 4, True)])
    vq.pop()
    assert dq.avail_event() == 1
    vq.pop()
    assert dq.avail_event() == 2
    assert vq.pop() is None
    assert dq.avail_event() == 2  # "kick me when you add entry 2"


def test_no_interrupt_flag_without_event_idx(env):
    mem, alloc, dq, vq = env
    activate(vq)
    buf = alloc(4)
    head = dq.add([(buf, 4, True)])
    vq.pop()
    vq.push(head, 4)
    assert vq.should_notify()
    mem.write_u16(dq.avail, 1)  # VRING_AVAIL_F_NO_INTERRUPT
    assert not vq.should_notify()


def test_set_notification_flags(env):
    mem, _alloc, dq, vq = env
    activate(vq)
    vq.set_notification(False)
    assert mem.read_u16(dq.used) == 1
    vq.set_notification(True)
    assert mem.read_u16(dq.used) == 0


def test_not_ready_queue_pops_nothing(env):
    _mem, alloc, dq, vq = env
    dq.add([(alloc(4), 4, True)])
    assert vq.pop() is None


def test_zero_length_descriptor_allowed(env):
    _mem, alloc, dq, vq = env
    activate(vq)
    dq.add([(alloc(4), 0, False), (alloc(4), 4, DESC_WRITE == 2)])
    chain = vq.pop()
    assert chain.read_len == 0 and chain.write_len == 4


def test_dma_hook_reports_writable_ranges_on_release(env):
    _mem, alloc, dq, vq = env
    activate(vq)
    seen = []
    vq.dma_hook = lambda gpa, n: seen.append((gpa, n))
    a, b, c = alloc(16), alloc(512), alloc(1)
    dq.add([(a, 16, False), (b, 512, True), (c, 1, True)])
    chain = vq.pop()
    assert seen == []  # nothing reported before the device is done
    chain.release()
    assert seen == [(b, 512), (c, 1)]
    chain.release()
    assert seen == [(b, 512), (c, 1)]  # once only
    # a chain that fails validation reports nothing
    dq.add([(alloc(8), 8, True), ((4 << 20) - 4, 8, True)])
    with pytest.raises(VirtqueueError):
        vq.pop()
    assert len(seen) == 2
