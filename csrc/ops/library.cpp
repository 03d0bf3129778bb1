// The aiaas_fast operator namespace. Each op declares its schema once, in its own
// file (csrc/ops/<op>.cpp), as a fragment of this library; kernels for each device
// register under that schema beside it (CPU) or in csrc/cuda/<op>.cu.
#include <torch/library.h>

TORCH_LIBRARY(aiaas_fast, m) {}
