cimport cython

cdef class Agg:
    cdef public object A
    cdef public object total
    cdef public list sums, anch, counts, top
    cdef public dict buckets, pending

cdef class LeadState:
    cdef public object key, anonymous, stage, transitions, recycled_at, handoffs, rejected, alerts, seq, t, t_str
    cdef public dict attrs, vals, aggs, seen, seen_old
    cdef public object rev, email, qualified, fit, eng, version, _fitc, _er, _cmp, _fit_rs, _fit_v

@cython.locals(state=LeadState, agg=Agg, ag=Agg, i=cython.Py_ssize_t, occ=cython.double, w=cython.double,
               h_s=cython.double, k=cython.double)
cpdef _fold_events(LeadState state, object events, object book, object out, bint new_id=*, object merges=*,
                   object on_error=*, object tags=*, object on_handoff=*)
