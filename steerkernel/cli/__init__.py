"""The ``steerkernel`` command line (see ``steerkernel --help``)."""
