# Cython types for the compiled projections/log_fold.py (setup.py); the source stays plain Python.
import cython

@cython.locals(v=bytes, k=bytes, parts=list, after=bytes, g=list)
cpdef collect_anonymous(list recs, dict anon)

@cython.locals(recs=list, i=Py_ssize_t, refused=bint)
cpdef tuple lead_records(list raw)
