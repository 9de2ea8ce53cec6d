"""The ``meshproxy`` command (``main``) and its people-facing subcommands (``ctl``, ``demo``)."""
