cimport cython

@cython.final
cdef class Agg:
    cdef public object A
    cdef public double total
    cdef public list sums, anch, counts, top
    cdef public dict buckets, pending

@cython.final
cdef class LeadState:
    cdef public object key, anonymous, stage, transitions, recycled_at, handoffs, rejected, alerts, seq, t, t_str
    cdef public dict attrs, vals, aggs, seen, seen_old
    cdef public object rev, email, qualified, fit, eng, version, _fitc, _er, _cmp, _fit_rs, _fit_v

@cython.final
cdef class Identity:
    cdef public dict anon_to_lead
    cpdef tuple route(self, object ev)

@cython.final
cdef class Ledger:
    cdef public object book, emit
    cdef public bint window
    cdef public Identity identity
    cdef public dict leads, anons, _keys, _qa, _ql, _joins, _tags
    cdef public set seen
    cdef public Py_ssize_t duplicates, _nq

    @cython.locals(seen=set, r=tuple, key=object)
    cpdef route(self, dict ev)

    @cython.locals(queues=dict, q=list, j=dict, r=tuple, anonymous=cython.bint)
    cpdef bint add(self, dict ev, object tag=*) except -1

    @cython.locals(qa=dict, ql=dict, joins=dict, tags=dict, anons=dict, leads=dict, evs=list, st=LeadState,
                   merges=dict, j=dict, window=cython.bint)
    cpdef flush(self, object on_error=*)

    cpdef apply_all(self, object events, object chunk=*)

cdef bint _COMPILED
cdef long long _NOT_WIRE
cdef str _WIRE
cdef unsigned int _WIRE_SEPARATORS

@cython.locals(us=cython.longlong)
cpdef double epoch_s(object s) except? -1.0

@cython.locals(y=cython.longlong, mo=cython.longlong, d=cython.longlong, h=cython.longlong, mi=cython.longlong,
               sec=cython.longlong, us=cython.longlong, days=cython.longlong, v=cython.longlong, i=cython.int,
               c=cython.Py_UCS4)
cdef cython.longlong _wire_us(str s) except? -2

cpdef normalise_email(object e)
cpdef tuple subject_of(object ev)

@cython.locals(attrs=dict, vals=dict)
cpdef _set_attrs(LeadState state, object mapping, object ra, object eid)

@cython.locals(vals=dict)
cpdef tuple _fit(LeadState state, object rs)

cpdef _qualified(object q)
cpdef iso_utc(object s)
cpdef dict _base(LeadState state, object etype, object rs, object cause)
cpdef _stage_changed(LeadState state, object event, object payload, object rs, object out, object occ)
cpdef _fire_intents(LeadState state, object event, object rs, object thens, object occ, object out, object book)
cpdef _mql(LeadState state, object rs_now, object eid, object fit, object eng, object out)
cpdef merge(object lead, object anon, object book)
cpdef _merge_agg(object a, object b, object rs)

cpdef _transition(LeadState state, object to, object rs, object cause, object reason, object by, object out, object occ)

@cython.locals(state=LeadState, agg=Agg, ag=Agg, i=cython.Py_ssize_t, occ=cython.double, w=cython.double,
               h_s=cython.double, k=cython.double, t=cython.double, eng=cython.double, f=cython.double,
               fA=cython.double, has_f=cython.bint, an=cython.double, s=cython.double, c=cython.double,
               pts=cython.double, dc=cython.double, nl=cython.double, anonymous=cython.bint, seen=dict,
               aggs=dict, ri=cython.Py_ssize_t, plans=dict, plan=list, memo=dict,
               eff=cython.double, event=dict, payload=dict, now_hs=cython.double, w_hs=cython.double)
cpdef _fold_events(LeadState state, object events, object book, object out, bint new_id=*, object merges=*,
                   object on_error=*, object tags=*, object on_handoff=*, bint window=*)
