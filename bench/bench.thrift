/**
 * The benchmark service. bench/src/upstream.c serves it (by hand, not
 * generated code) and bench/src/loadgen.c calls it; bench/test_bench_tools.py
 * checks the upstream against a real thriftpy2 client built from this file.
 *
 * echo returns its argument, so a call with an N-byte payload moves N bytes
 * each way and the load generator can check every reply byte for byte.
 */
namespace py bench

service Bench {
  /** Returns `data` unchanged. */
  binary echo(1: binary data),
}
