"""Run configuration: :mod:`schema` (the dataclasses), :mod:`build` (from YAML, overrides and
flags, checked against the registries) and :mod:`identity` (the run id).

Import from the submodules: this package imports none of them, so that the
methods can import the schema without pulling in the registries that
:mod:`build` needs.
"""
