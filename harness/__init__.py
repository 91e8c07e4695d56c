"""What the demo, the tests and the benchmarks run on, apart from what ships: a local Orthanc as
PACS, synthetic CT studies with planted identifiers, phantoms, the leak scanner, the demo itself.

Production code never imports this package (tests/test_layout.py); `sphere demo` runs
`harness.demo` by name from a development install, and says so where there is none.
"""
