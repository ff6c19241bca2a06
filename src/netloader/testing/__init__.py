"""Test harnesses other projects and netloader's own tests build on (emulated hosts: :mod:`.hosts`)."""
