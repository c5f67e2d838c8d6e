"""The corpus side: raw text into training data, as datatrove pipelines (offline jobs, their own engine).

:mod:`danube.corpus.inputs` reads corpora as they ship, :mod:`danube.corpus.steps` holds danube's
pipeline steps, :mod:`danube.corpus.prepare` runs ``danube prepare``. Training reads the result
through :mod:`danube.data`.
"""
