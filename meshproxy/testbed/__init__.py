"""Throwaway MySQL servers for the demo, ``topology up --local``, the tests and the benchmarks."""
