"""The CPU side: compute threads and the compiler, the C++ kernels, the float linears that call them, freeing memory."""
