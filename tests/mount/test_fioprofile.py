"""tools/fioprofile.py files each py-spy sample under the right category."""

from tools.fioprofile import CATEGORIES, FUSE_LOOP, classify, tally

ROOT = ["_run_module_as_main (<frozen runpy>:198)", "<module> (mountd/__main__.py:5)",
        "main (mountd/main.py:118)", "run (mountd/daemon.py:341)",
        "run (trio/_core/_run.py:2532)"]
TASK = [*ROOT, "unrolled_run (trio/_core/_run.py:2866)",
        "async_wrapper.<locals>.wrapper (_pyfuse3.py:58)",
        "__pyx_gb_7pyfuse3_38generator12 (__init__.c:14373)"]
WRITE = [*TASK, "Operations.write (mountd/operations.py:253)",
         "Volume.write (swapfs/engine/volume.py:495)"]


def _group(frames: list[str]) -> tuple[str, str]:
    category = classify(frames)
    return category.group, category.part


def test_the_deepest_named_step_wins_over_the_handler_around_it() -> None:
    commit = [*WRITE, "Txn.__exit__ (swapfs/engine/index.py:185)",
              "Txn.commit (swapfs/engine/index.py:195)",
              "Journal.append (swapfs/engine/journal.py:176)", "pwrite64 (libc.so.6)"]
    assert _group(commit)[0] == "commit: journal append, LMDB commit of a batch"
    data = [*WRITE, "ChainWrite.set_blocks (swapfs/engine/chainwrite.py:117)",
            "BlockStore.write_many (swapfs/engine/store.py:92)", "pwritev64v2 (libc.so.6)"]
    assert _group(data)[0] == "digest, seal and open, data read/write"
    tables = [*WRITE, "ChainWrite.set_blocks (swapfs/engine/chainwrite.py:117)",
              "SlotTable.claim (swapfs/engine/slottable.py:380)",
              "DedupTable.add (swapfs/engine/deduptable.py:170)"]
    assert _group(tables)[0] == "slot table, dedup table, file maps and their index puts"
    punch = [*WRITE, "ChainWrite.punch (swapfs/engine/chainwrite.py:190)",
             "BlockStore.punch (swapfs/engine/store.py:130)",
             "punch_hole (swapfs/engine/store.py:32)",
             "fallocate64 (libc.so.6)"]
    assert _group(punch)[0] == "hole punch (store.punch, fallocate)"
    assert _group(WRITE)[0].startswith("other Python")
    # The FUSE handlers are the request's glue, not a daemon task.
    assert _group(WRITE[:-1])[0].startswith("other Python")


def test_compiled_frames_fall_where_their_python_would() -> None:
    """A compiled module's function shows without its class, a method a
    .pxd declares by its C name."""
    write = [*TASK, "Operations.write (mountd/operations.py:253)",
             "write (swapfs/engine/volume.py:495)"]
    commit = [*write, "__exit__ (swapfs/engine/index.py:185)",
              "commit (swapfs/engine/index.py:195)", "mdb_txn_commit (mdb.c:4120)"]
    assert _group(commit)[0] == "commit: journal append, LMDB commit of a batch"
    claim = [*write, "set_blocks (swapfs/engine/chainwrite.py:117)",
             "SlotTable_claim (swapfs/engine/slottable.py:380)"]
    assert _group(claim)[0] == "slot table, dedup table, file maps and their index puts"
    puts = [*write, "finish (swapfs/engine/chainwrite.py:200)",
            "put_slot_run (swapfs/engine/index.py:1064)", "mdb09_put (mdb.c:8000)"]
    assert _group(puts)[0] == "slot table, dedup table, file maps and their index puts"
    data = [*write, "set_blocks (swapfs/engine/chainwrite.py:117)",
            "write_many (swapfs/engine/store.py:92)", "pwritev64v2 (libc.so.6)"]
    assert _group(data)[0] == "digest, seal and open, data read/write"
    assert _group(write)[0].startswith("other Python")


def test_a_cache_hit_is_the_caches() -> None:
    read = [*TASK, "Operations.read (mountd/operations.py:230)",
            "Volume.read (swapfs/engine/volume.py:395)",
            "Volume._cached (swapfs/engine/volume.py:490)",
            "BlockCache.get (swapfs/cache/blockcache.py:120)"]
    assert _group(read)[0] == "content and transient caches"
    pool = [*read[:-1], "TransientCache.get (swapfs/cache/transient.py:88)"]
    assert _group(pool)[0] == "content and transient caches"


def test_the_loop_is_split_by_its_system_call() -> None:
    reply = [*TASK, "0x7f52c53a204a (libfuse3.so.3.14.0)", "writev (libc.so.6)"]
    assert _group(reply)[0] == FUSE_LOOP and _group(reply)[1].startswith("reply")
    parked = [*ROOT, "EpollIOManager.get_events (trio/_core/_io_epoll.py:243)",
              "select_epoll_poll_impl (selectmodule.c:1598)", "epoll_wait (libc.so.6)"]
    assert _group(parked)[1].startswith("epoll")
    # The daemon's start-up frames (mountd/) are not a daemon task.
    assert _group([*TASK, "unrolled_run (trio/_core/_run.py:2931)"]) == (
        FUSE_LOOP, CATEGORIES[-1].part)
    control = [*ROOT, "unrolled_run (trio/_core/_run.py:2866)",
               "ControlServer.serve (mountd/controlserver.py:60)"]
    assert _group(control)[0].startswith("daemon tasks")


def test_tally_counts_the_main_thread_only() -> None:
    raw = "\n".join([
        f"thread (7): MainThread;{';'.join(WRITE)} 5",
        f"thread (7): MainThread;{';'.join(TASK)};read (libc.so.6) 3",
        f"thread (70): Trio thread 0;{';'.join(WRITE)} 100",
    ])
    counts, leaves = tally(raw, 7)
    assert sum(counts.values()) == 8
    (other,) = [category for category in counts if category.group.startswith("other Python")]
    assert counts[other] == 5
    assert leaves[other] == {"Volume.write (swapfs/engine/volume.py:495)": 5}
