from Cython.Build import cythonize
from setuptools import Extension, setup

# One Extension list and one directives dict (house style, as picows/uvloop).
extensions = [
    Extension("pushcore._frame", ["pushcore/_frame.pyx"], extra_compile_args=["-O2"]),
    Extension("pushcore._ingest", ["pushcore/_ingest.pyx"], extra_compile_args=["-O2"]),
    Extension("pushcore._http", ["pushcore/_http.pyx"], extra_compile_args=["-O2"]),
    Extension("server._io", ["server/_io.pyx"], extra_compile_args=["-O2"]),
]

directives = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
}

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
)
