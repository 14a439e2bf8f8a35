# Cython types for the compiled events/wire.py (setup.py); the source stays plain Python.
import cython

@cython.locals(d=dict)
cpdef check_envelope(object ev)
