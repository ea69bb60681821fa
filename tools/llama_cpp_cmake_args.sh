#!/bin/sh
# CMAKE_ARGS for building llama-cpp-python (the test extra) on this CPU.
# llama.cpp's default -march=native also compiles its AMX matmul where the CPU
# reports AMX, and that path crashed with a segmentation fault on this
# project's Xeon machines (tests/test_gguf.py, Q4_0). So: GGML_NATIVE off and
# every other instruction set this CPU has named explicitly, AMX left out.
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has() { case " $flags " in *" $1 "*) return 0;; esac; return 1; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
has avx && args="$args -DGGML_AVX=ON"
has avx2 && args="$args -DGGML_AVX2=ON"
has fma && args="$args -DGGML_FMA=ON"
has f16c && args="$args -DGGML_F16C=ON"
has avx_vnni && args="$args -DGGML_AVX_VNNI=ON"
has avx512f && args="$args -DGGML_AVX512=ON"
has avx512vbmi && args="$args -DGGML_AVX512_VBMI=ON"
has avx512_vnni && args="$args -DGGML_AVX512_VNNI=ON"
has avx512_bf16 && args="$args -DGGML_AVX512_BF16=ON"
echo "$args"
