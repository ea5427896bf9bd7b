# C types for slottable.py in the compiled build (docs/performance.md, "The
# compiled path"): the table becomes an extension type, so its fields are C
# fields and the per-slot methods a request calls are C calls with C
# integers. The .py keeps Python's meaning.

cimport cython

from swapfs.engine.deduptable cimport DedupTable


@cython.locals(chain_id=Py_ssize_t, slot=Py_ssize_t, refcount=Py_ssize_t)
cpdef unsigned int entry_crc(chain_id, slot, digest, refcount) except? 0xFFFFFFFF


cdef class SlotTable:
    cdef public object chain
    cdef public Py_ssize_t chain_id
    cdef object _source
    cdef public dict runs
    cdef public Py_ssize_t runs_kept
    cdef public Py_ssize_t runs_loaded
    cdef public Py_ssize_t next_slot
    cdef public Py_ssize_t stored
    cdef tuple _saved
    cdef public DedupTable dedup
    cdef public set bad
    cdef public set damaged
    cdef dict _dirty
    cdef set _lost
    cdef set _damaged_dirty
    cdef dict _free
    cdef list _free_runs
    cdef public Py_ssize_t free_count
    cdef Py_ssize_t _scan_at
    cdef public bint scanned
    cdef DedupTable _building
    cdef set _named_in_scan
    cdef list _unnamed

    @cython.locals(run=Py_ssize_t)
    cpdef bytearray _run(self, Py_ssize_t run)

    @cython.locals(run=Py_ssize_t, at=Py_ssize_t, raw=bytearray)
    cpdef tuple _entry(self, Py_ssize_t slot)

    cpdef object _digest_of(self, Py_ssize_t slot)

    cpdef bytes digest(self, Py_ssize_t slot)

    cpdef object find(self, bytes digest)

    @cython.locals(run=Py_ssize_t, at=Py_ssize_t, raw=bytearray)
    cpdef void _set(self, Py_ssize_t slot, digest, Py_ssize_t refcount) except *

    cdef void _changed(self, Py_ssize_t run, Py_ssize_t at) except *

    cpdef void _index(self, bytes digest, Py_ssize_t slot) except *

    cpdef void _unindex(self, bytes digest, Py_ssize_t slot) except *

    cpdef void claim(self, Py_ssize_t slot, bytes digest, Py_ssize_t refcount=*) except *

    @cython.locals(refcount=Py_ssize_t)
    cpdef void ref(self, Py_ssize_t slot, Py_ssize_t count=*) except *

    @cython.locals(refcount=Py_ssize_t)
    cpdef bint unref(self, Py_ssize_t slot, Py_ssize_t count=*) except *

    cpdef void clear_mark(self, Py_ssize_t slot) except *

    @cython.locals(slot=Py_ssize_t, run=Py_ssize_t)
    cpdef Py_ssize_t grow(self) except -1
