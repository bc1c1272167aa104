"""The KV cache's page table on the host: pages free, held and cached, and
prefix keys (`tp_zoo.serving.pages`). The engine's use of it, against
`lm.generate`: tests/serving/test_engine.py."""

from tp_zoo.serving.pages import PageTable
from tp_zoo.serving.pages import prefix_keys


def test_prefix_keys_name_whole_pages_by_every_id_before_them():
    """A key per whole page; equal while the ids up to the page's end are
    equal, different from the first page whose ids differ on."""
    ids = list(range(1, 11))
    keys = prefix_keys(ids, 4)
    assert len(keys) == 2 and len(prefix_keys(ids[:3], 4)) == 0
    assert prefix_keys(ids[:8] + [99], 4) == keys
    changed = prefix_keys(ids[:5] + [99] + ids[6:], 4)
    assert changed[0] == keys[0] and changed[1] != keys[1]
    assert prefix_keys([99] + ids[1:], 4)[1] != keys[1]  # a page's key covers the pages before it


def test_pages_held_cached_and_taken_back_least_recently_used_last_pages_first():
    table = PageTable(7)  # 6 pages for sequences
    a = table.take(3)
    assert (table.used, table.free) == (3, 3) and table.take(4) is None and table.used == 3
    keys = [b"k0", b"k1"]
    table.remember(a[0], keys[0])
    table.remember(a[1], keys[1])
    table.give_back(a)  # a[2] holds no prefix: free; a[0], a[1] cached
    assert (table.used, table.free) == (0, 6)
    b = table.match(keys + [b"k2"])  # held again, by a new sequence
    assert b == a[:2] and table.used == 2
    c = table.match(keys[:1])  # and by another: a[0] is held twice
    assert c == a[:1]
    table.give_back(b)
    assert table.used == 1  # a[0] still held; a[1] cached
    table.give_back(c)
    others = table.take(4)  # the free pages
    assert not set(others) & set(a[:2]) and table.match(keys) == a[:2]
    table.give_back(a[:2])
    assert table.take(1) == [a[1]]  # no page free: the last page of the prefix goes first
    assert table.match(keys) == a[:1]  # its key forgotten, the first page's kept
    table.give_back(a[:1])
    table.forget()
    assert table.match(keys) == [] and (table.used, table.free) == (5, 1)


def test_a_prefix_remembered_twice_keeps_its_first_page():
    table = PageTable(4)
    first, second = table.take(1), table.take(1)
    table.remember(first[0], b"k")
    table.remember(second[0], b"k")
    table.give_back(first + second)
    assert table.free == 3 and table.match([b"k"]) == first and table.free == 2
