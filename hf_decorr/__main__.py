"""``python -m hf_decorr``: the ``hf-decorr`` command (inspect, compare, ablate)."""

from hf_decorr.app.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
