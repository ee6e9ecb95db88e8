"""The one part of the build pyproject.toml cannot declare without setuptools' experimental table:
decontaminate's n-gram pass in C (plain CPython API, no other dependency). ``optional``: where it cannot
be compiled the install goes on, and ``clinmega.data.decontam._numpy_ngrams`` computes the same hashes."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("clinmega.data._ngrams", sources=["clinmega/data/_ngrams.c"], optional=True)])
