# C types for deduptable.py in the compiled build (docs/performance.md, "The
# compiled path"): the tables become extension types whose buckets are C
# arrays, so a probe is a loop of C compares. The .py keeps Python's meaning.

cimport cython


cdef unsigned int _EMPTY, _GONE


cdef class DedupBudget:
    cdef public object limit
    cdef public Py_ssize_t used


@cython.locals(word=cython.ulonglong, size=cython.ulonglong)
cdef Py_ssize_t _bucket(word, size)


cdef class DedupTable:
    cdef object _digest_of
    cdef DedupBudget _budget
    cdef tuple _maps
    cdef public unsigned int[:] slots
    cdef public unsigned short[:] tags
    cdef public Py_ssize_t size
    cdef public Py_ssize_t entries
    cdef Py_ssize_t _filled
    cdef public Py_ssize_t unindexed

    @cython.locals(at=Py_ssize_t, size=Py_ssize_t, held=cython.uint, tag=cython.uint, slots=cython.uint[:],
                   tags=cython.ushort[:], word=cython.ulonglong, _probe=Py_ssize_t)
    cpdef object find(self, bytes digest)

    @cython.locals(at=Py_ssize_t, size=Py_ssize_t, tag=cython.uint, word=cython.ulonglong,
                   slots=cython.uint[:])
    cpdef bint add(self, bytes digest, Py_ssize_t slot) except *

    @cython.locals(at=Py_ssize_t, size=Py_ssize_t, held=cython.uint, _probe=Py_ssize_t,
                   slots=cython.uint[:])
    cpdef void remove(self, bytes digest, Py_ssize_t slot) except *
