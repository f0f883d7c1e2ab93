"""The stages, each a Prefect flow that DVC runs as ``python -m pipeline.<stage> ...paths``.

Importing this package sets the offline/quiet environment (``aigc.environment``) before Prefect
or MLflow load, so a user never has to export anything; a value the user did set wins.
"""

from aigc import environment

environment.apply()
