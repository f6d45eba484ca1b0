// The quantized-matmul tile kernel, written once over a small vector interface `V`.
//
// Included by each ISA translation unit inside its own anonymous namespace, so the
// differently compiled copies never meet at link time.
//
// y[m, n] = sum_g s[n,g] * dot(x[m, g], q[n, g]) + b[n,g] * sum(x[m, g])
// i.e. the affine dequantization w = s*q + b folded into the dot product, in float32.
// Bit widths 4, 5, 6 and 8; V unpacks each (V::q4, V::q8, V::qb<5 or 6>).

template <class V>
struct Kernel {
  using R = typename V::reg;
  static constexpr int W = V::W;

  static float sc(const QmmArgs& a, long i) {
    return a.half_scales ? V::h2f(static_cast<const uint16_t*>(a.s)[i]) : static_cast<const float*>(a.s)[i];
  }
  static float bi(const QmmArgs& a, long i) {
    return a.half_scales ? V::h2f(static_cast<const uint16_t*>(a.b)[i]) : static_cast<const float*>(a.b)[i];
  }

  // Scales or biases of one row as float32.
  static void row_f32(const void* p, bool half, long off, int G, float* out) {
    if (half) V::h2f_n(static_cast<const uint16_t*>(p) + off, out, G);
    else for (int g = 0; g < G; g++) out[g] = static_cast<const float*>(p)[off + g];
  }

  // Elements e .. e + 2W - 1 of a packed row as two registers, in xp's order (see QmmArgs).
  template <int BITS>
  static void wload(const uint8_t* row, int e, R& lo, R& hi) {
    if (BITS == 4) V::q4(row + e / 2, lo, hi);
    else if (BITS == 8) V::q8(row + e, lo, hi);
    else V::template qb<BITS>(row, e, lo, hi);  // 5, 6: natural order
  }

  // f(std::integral_constant<int, bits>) for the bit widths the kernels take.
  template <class F>
  static void by_bits(int bits, F&& f) {
    switch (bits) {
      case 4: return f(std::integral_constant<int, 4>());
      case 5: return f(std::integral_constant<int, 5>());
      case 6: return f(std::integral_constant<int, 6>());
      default: return f(std::integral_constant<int, 8>());
    }
  }

  // Dot products of 4 weight rows with one activation row, straight from packed data
  // (decode: each weight byte is used once, so no dequantized copy is worth making).
  // BITS is a template parameter so the inner loop carries no format branches.
  template <int BITS>
  static void direct4(const QmmArgs& a, int m, int n, float* out) {
    const int G = a.K / a.gs, rb = a.K * BITS / 8;
    const float* x = a.xp + (long)m * a.K;
    const float* xs = a.xs + (long)m * G;
    thread_local float* sb = nullptr;  // [4 rows] x [scales | biases] x G
    thread_local int cap = 0;
    if (8 * G > cap) {
      delete[] sb;
      sb = new float[8 * G];
      cap = 8 * G;
    }
    R acc[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
    const uint8_t* wr[4];
    for (int r = 0; r < 4; r++) {
      wr[r] = a.w + (long)(n + r) * rb;
      row_f32(a.s, a.half_scales, (long)(n + r) * G, G, sb + r * G);
      row_f32(a.b, a.half_scales, (long)(n + r) * G, G, sb + (4 + r) * G);
    }
    for (int g = 0; g < G; g++) {
      R ag[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
      const int k0 = g * a.gs;
      for (int e = k0; e < k0 + a.gs; e += 2 * W) {
        R x0 = V::load(x + e), x1 = V::load(x + e + W);
        for (int r = 0; r < 4; r++) {
          R lo, hi;
          wload<BITS>(wr[r], e, lo, hi);
          ag[r] = V::fma(lo, x0, ag[r]);
          ag[r] = V::fma(hi, x1, ag[r]);
        }
      }
      for (int r = 0; r < 4; r++) acc[r] = V::fma(ag[r], V::set1(sb[r * G + g]), acc[r]);
    }
    for (int r = 0; r < 4; r++) {
      float bsum = 0;  // sum_g bias[g] * sum(x in group g)
      for (int g = 0; g < G; g++) bsum += sb[(4 + r) * G + g] * xs[g];
      out[r] = V::sum(acc[r]) + bsum;
    }
  }

  template <int BITS>
  static void direct1(const QmmArgs& a, int m, int n, float* out) {
    const int G = a.K / a.gs, rb = a.K * BITS / 8;
    const float* x = a.xp + (long)m * a.K;
    const uint8_t* wr = a.w + (long)n * rb;
    R acc = V::zero();
    float bsum = 0;
    for (int g = 0; g < G; g++) {
      R ag = V::zero();
      for (int e = g * a.gs; e < (g + 1) * a.gs; e += 2 * W) {
        R lo, hi;
        wload<BITS>(wr, e, lo, hi);
        ag = V::fma(lo, V::load(x + e), ag);
        ag = V::fma(hi, V::load(x + e + W), ag);
      }
      acc = V::fma(ag, V::set1(sc(a, (long)n * G + g)), acc);
      bsum += bi(a, (long)n * G + g) * a.xs[(long)m * G + g];
    }
    *out = V::sum(acc) + bsum;
  }

  // Dequantize rows [n0, n1), elements [k0, k1) (group-aligned; all by default) into `dst`
  // (float32, rows of k1 - k0, same element order as xp).
  template <int BITS>
  static void dequant(const QmmArgs& a, int n0, int n1, float* dst, int k0 = 0, int k1 = -1) {
    if (k1 < 0) k1 = a.K;
    const int G = a.K / a.gs, rb = a.K * BITS / 8;
    for (int n = n0; n < n1; n++) {
      const uint8_t* wr = a.w + (long)n * rb;
      float* d = dst + (long)(n - n0) * (k1 - k0) - k0;
      for (int g = k0 / a.gs; g < k1 / a.gs; g++) {
        R s = V::set1(sc(a, (long)n * G + g)), b = V::set1(bi(a, (long)n * G + g));
        for (int e = g * a.gs; e < (g + 1) * a.gs; e += 2 * W) {
          R lo, hi;
          wload<BITS>(wr, e, lo, hi);
          V::store(d + e, V::fma(lo, s, b));
          V::store(d + e + W, V::fma(hi, s, b));
        }
      }
    }
  }

  // 4x4 register tile of x rows times dequantized weight rows.
  static void gemm4x4(const float* x, const float* w, int K, float* y, long ldy) {
    R c[4][4];
    for (int i = 0; i < 4; i++)
      for (int j = 0; j < 4; j++) c[i][j] = V::zero();
    for (int k = 0; k < K; k += W) {
      R xv[4], wv[4];
      for (int i = 0; i < 4; i++) xv[i] = V::load(x + (long)i * K + k);
      for (int j = 0; j < 4; j++) wv[j] = V::load(w + (long)j * K + k);
      for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) c[i][j] = V::fma(xv[i], wv[j], c[i][j]);
    }
    for (int i = 0; i < 4; i++)
      for (int j = 0; j < 4; j++) y[i * ldy + j] = V::sum(c[i][j]);
  }

  static float dot(const float* x, const float* w, int K) {
    R c = V::zero();
    for (int k = 0; k < K; k += W) c = V::fma(V::load(x + k), V::load(w + k), c);
    return V::sum(c);
  }

  // Prefill: dequantize the tile's weight rows once, reuse them for every x row.
  static void tiled(const QmmArgs& a, int m0, int m1, int n0, int n1) {
    thread_local float* buf = nullptr;
    thread_local long cap = 0;
    const long need = (long)(n1 - n0) * a.K;
    if (need > cap) {
      delete[] buf;
      buf = new float[need];
      cap = need;
    }
    by_bits(a.bits, [&](auto b) { dequant<decltype(b)::value>(a, n0, n1, buf); });
    const int nn = n1 - n0, n4 = nn / 4 * 4, m4 = m0 + (m1 - m0) / 4 * 4;
    for (int m = m0; m < m4; m += 4)
      for (int j = 0; j < n4; j += 4)
        gemm4x4(a.xp + (long)m * a.K, buf + (long)j * a.K, a.K, a.y + (long)m * a.N + n0 + j, a.N);
    for (int m = m0; m < m1; m++)
      for (int j = (m < m4 ? n4 : 0); j < nn; j++)
        a.y[(long)m * a.N + n0 + j] = dot(a.xp + (long)m * a.K, buf + (long)j * a.K, a.K);
  }

  // Prompts: a register-blocked GEMM on weights dequantized once per task into panels
  // [k][NR] (NR = 2W weight rows side by side, transposed W x W in registers). The
  // micro-kernel does MR x 2 vector FMAs per k from 2 panel loads and MR broadcasts of x:
  // FMA-bound (~115 GMAC/s per AVX-512 core here), where the 4x4 dot-product tile (tiled)
  // spends its time on loads and horizontal sums (~70). Packing is paid once per weight row
  // and m-block, so below kGemmRows rows the 4x4 tile stays ahead. K is cut into chunks of
  // KC: the x rows' chunk stays in L2 for every panel of the task.
  static constexpr int NR = 2 * W, MR = 6, KC = 256;

  template <int M>
  static void micro(const float* x, long ldx, const float* p, int kc, float* y, long ldy, bool add) {
    R c[M][2];
    for (int i = 0; i < M; i++) c[i][0] = c[i][1] = V::zero();
    for (int k = 0; k < kc; k++) {
      const R w0 = V::load(p + (long)k * NR), w1 = V::load(p + (long)k * NR + W);
      for (int i = 0; i < M; i++) {
        const R xv = V::set1(x[i * ldx + k]);
        c[i][0] = V::fma(xv, w0, c[i][0]);
        c[i][1] = V::fma(xv, w1, c[i][1]);
      }
    }
    for (int i = 0; i < M; i++)
      for (int j = 0; j < 2; j++) {
        float* o = y + i * ldy + j * W;
        V::store(o, add ? V::add(V::load(o), c[i][j]) : c[i][j]);
      }
  }

  template <int BITS>
  static void gemm(const QmmArgs& a, int m0, int m1, int n0, int n1) {
    thread_local std::vector<float> rows, panel;
    const int kstep = std::max(a.gs, KC / a.gs * a.gs);
    rows.resize((size_t)NR * kstep);
    panel.resize((size_t)NR * kstep);
    const int n_end = n0 + (n1 - n0) / NR * NR;
    for (int k0 = 0; k0 < a.K; k0 += kstep) {
      const int kc = std::min(kstep, a.K - k0);
      const bool add = k0 > 0;
      for (int n = n0; n < n_end; n += NR) {
        dequant<BITS>(a, n, n + NR, rows.data(), k0, k0 + kc);
        for (int rb = 0; rb < NR; rb += W)  // transpose into [k][NR], W x W at a time
          for (int k = 0; k < kc; k += W) {
            R t[W];
            for (int i = 0; i < W; i++) t[i] = V::load(rows.data() + (size_t)(rb + i) * kc + k);
            V::transpose(t);
            for (int i = 0; i < W; i++) V::store(panel.data() + (size_t)(k + i) * NR + rb, t[i]);
          }
        const float* x = a.xp + (long)m0 * a.K + k0;
        float* y = a.y + (long)m0 * a.N + n;
        int m = m0;
        for (; m + MR <= m1; m += MR, x += MR * (long)a.K, y += MR * (long)a.N)
          micro<MR>(x, a.K, panel.data(), kc, y, a.N, add);
        switch (m1 - m) {
          case 5: micro<5>(x, a.K, panel.data(), kc, y, a.N, add); break;
          case 4: micro<4>(x, a.K, panel.data(), kc, y, a.N, add); break;
          case 3: micro<3>(x, a.K, panel.data(), kc, y, a.N, add); break;
          case 2: micro<2>(x, a.K, panel.data(), kc, y, a.N, add); break;
          case 1: micro<1>(x, a.K, panel.data(), kc, y, a.N, add); break;
        }
      }
    }
    if (n_end < n1) tiled(a, m0, m1, n_end, n1);  // rows short of a panel
  }

  static void tile(const QmmArgs& a, int m0, int m1, int n0, int n1) {
    if (m1 - m0 >= kGemmRows && W > 1)
      return by_bits(a.bits, [&](auto b) { gemm<decltype(b)::value>(a, m0, m1, n0, n1); });
    if (m1 - m0 >= 4) return tiled(a, m0, m1, n0, n1);
    by_bits(a.bits, [&](auto b) {
      constexpr int BITS = decltype(b)::value;
      for (int m = m0; m < m1; m++) {
        int n = n0;
        for (; n + 4 <= n1; n += 4) direct4<BITS>(a, m, n, a.y + (long)m * a.N + n);
        for (; n < n1; n++) direct1<BITS>(a, m, n, a.y + (long)m * a.N + n);
      }
    });
  }
};
