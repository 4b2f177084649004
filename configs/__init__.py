"""The run configuration's defaults (``magicstyle.yaml``) and SD1.5's hyper-parameters (``model/sd15.yaml``), shipped
as package data and read with ``importlib.resources`` (``magicstyle.config.load_config``)."""
