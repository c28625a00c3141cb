"""The bundled recipes and NNI search spaces (``*.yaml``).

This folder is the only copy. It installs as the package ``nni_steppingnet.recipes`` (see
``[tool.setuptools.package-dir]`` in pyproject.toml); use :func:`nni_steppingnet.config.recipes_dir`
to find it rather than importing this module.
"""
