"""Tools for the tests and the benchmarks (launching `bentoml serve`); not part of the shipped packages or the Bento."""
