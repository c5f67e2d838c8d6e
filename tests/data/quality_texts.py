"""The quality tests' documents come from the package (``danube quality sample`` writes them too)."""

from danube.data.quality.sample import boilerplate, clean_docs, junk_docs, prose_lines  # noqa: F401
