"""The grid runner's parts: ``schema`` (the YAML format), ``plan`` (cells, stages, keys and
their execution), ``tables`` and ``plots``. ``LaMP/reproduce.py`` is the command line."""
