"""The offline steps, one module each (``python -m geoloc STEP``, see :mod:`geoloc.__main__`): each reads
its Hydra config, calls the library and writes a versioned artifact atomically. Nothing else in geoloc
has a command line, except ``geoloc-predict`` (:mod:`geoloc.inference.cli`)."""
