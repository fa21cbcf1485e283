// Test hook body (one copy per ISA, see simd_bindings.cpp): applies one function of the
// SIMD vocabulary to each row of a float32 matrix, so tests/test_cpu_simd.py can compare it
// with float64 under every instruction set the CPU runs. No include guard on purpose.

// fn: the index of the function in kCheckFns (simd_bindings.cpp). y has the shape of x
// ([rows, n]), except for row_sum (one value per row).
inline void check_rows(int fn, const float* x, float* y, idx rows, idx n, const float* w,
                       const float* b, float eps) {
  for (idx r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    switch (fn) {
      case 0: vmap(xr, yr, n, [](vf v) { return vexp(v); }); break;
      case 1: vmap(xr, yr, n, [](vf v) { return vlog1p_unit(v); }); break;
      case 2: vmap(xr, yr, n, [](vf v) { return vlogsigmoid(v); }); break;
      case 3: vmap(xr, yr, n, [](vf v) { return vsigmoid(v); }); break;
      case 4: vmap(xr, yr, n, [](vf v) { return vsilu(v); }); break;
      case 5: rmsnorm_row(xr, yr, w, n, eps); break;
      case 6: layernorm_row(xr, yr, w, b, n, eps); break;
      case 7: y[r] = row_sum(xr, n); break;
      default: break;
    }
  }
}

// y = exp(x) for n doubles, through a padded copy (exp_inplace takes whole vectors).
inline void check_exp_double(const double* x, double* y, idx n) {
  constexpr int L = lanes<double>();
  idx i = 0;
  for (; i + L <= n; i += L) vstore(y + i, vexp(vload(x + i)));
  if (i < n) {
    double t[L] = {};
    for (idx j = i; j < n; ++j) t[j - i] = x[j];
    exp_inplace(t, L);
    for (idx j = i; j < n; ++j) y[j] = t[j - i];
  }
}
