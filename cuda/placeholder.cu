extern "C" __global__ void placeholder(float* x) { x[0] = 1.0f; }
