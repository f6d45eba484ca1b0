// Causal / full scaled-dot-product attention over float32, written once over `V`
// (see qmm_impl.h). Included by each ISA translation unit inside its anonymous namespace.
//
// One task = one (batch, query head, block of query rows). Grouped-query attention:
// query head h reads key/value head h / (Hq / Hkv). With causal masking the L queries
// are the last L of the S positions: query i sees keys j <= S - L + i. A batch of left-padded
// rows (`start`) has row b's keys begin at start[b]: the positions before are padding.

template <class V>
struct Attention {
  using R = typename V::reg;
  static constexpr int W = V::W;

  static float dot(const float* a, const float* b, int D) {
    R c = V::zero();
    for (int d = 0; d < D; d += W) c = V::fma(V::load(a + d), V::load(b + d), c);
    return V::sum(c);
  }

  // sc[0, n) <- e^(sc - mx); returns their sum. Scalar and in order on purpose: a W-wide
  // polynomial exp (tried: ~7% of a 2,000-token context's decode) moves the int8 path's
  // rounding enough to flip SmolLM2's near-tie first token ("L'Étoile..." for "The capital
  // of France is Paris."), same fidelity on average (KL to float32 0.0038 either way).
  static float exp_sum(float* sc, int n, float mx) {
    float total = 0.f;
    for (int j = 0; j < n; j++) {
      sc[j] = expf(sc[j] - mx);  // libm call: no inline code shared across ISA units
      total += sc[j];
    }
    return total;
  }

  // out[0, D) = sum over j < n of p[j] * v[j][0, D), NR vectors of the row at a time held in
  // registers: accumulating into `out` in memory chained every key on the previous store.
  // Per element the same fmas in the same order, so the same result.
  template <int NR>
  static void wsum(const float* p, int n, const float* v, long vstride, float* out) {
    R acc[NR];
    for (int r = 0; r < NR; r++) acc[r] = V::zero();
    for (int j = 0; j < n; j++) {
      const R pj = V::set1(p[j]);
      const float* vr = v + long(j) * vstride;
      for (int r = 0; r < NR; r++) acc[r] = V::fma(pj, V::load(vr + r * W), acc[r]);
    }
    for (int r = 0; r < NR; r++) V::store(out + r * W, acc[r]);
  }

  static void weighted_sum(const float* p, int n, const float* v, long vstride, int D, float* out) {
    int d = 0;
    for (; d + 4 * W <= D; d += 4 * W) wsum<4>(p, n, v + d, vstride, out + d);
    for (; d < D; d += W) wsum<1>(p, n, v + d, vstride, out + d);
  }

  static void row(const AttnArgs& a, int bi, int h, int i, float* scores) {
    const int kvh = h / (a.Hq / a.Hkv);
    const float* q = a.q + bi * a.qs[0] + h * a.qs[1] + long(i) * a.qs[2];
    const float* k = a.k + bi * a.ks[0] + kvh * a.ks[1];
    const float* v = a.v + bi * a.vs[0] + kvh * a.vs[1];
    float* out = a.out + ((long(bi) * a.L + i) * a.Hq + h) * a.D;  // [B, L, Hq, D]
    const int lim = a.causal ? a.S - a.L + i + 1 : a.S;
    const int j0 = a.start ? a.start[bi] : 0;
    float mx = -3.0e38f;
    for (int j = j0; j < lim; j++) {
      float s = dot(q, k + long(j) * a.ks[2], a.D) * a.scale;
      scores[j] = s;
      mx = s > mx ? s : mx;
    }
    const float total = lim > j0 ? exp_sum(scores + j0, lim - j0, mx) : 0.f;
    weighted_sum(scores + j0, lim - j0, v + long(j0) * a.vs[2], a.vs[2], a.D, out);
    R inv = V::set1(lim > j0 ? 1.f / total : 0.f);  // a padding query sees no key: zeros
    for (int d = 0; d < a.D; d += W) V::store(out + d, V::mul(V::load(out + d), inv));
  }

  // Decode: task t is (batch row, key/value head, chunk c) for the G query heads that share
  // the head, so each key and value row is read once for all G (from memory: a long context's
  // cache does not stay in cache) rather than once per query head. Writes per query head
  // [max score, sum of exp(score - max), unnormalized output (D)] to a.part.
  static void decode(const AttnArgs& a, int t) {
    const int G = a.Hq / a.Hkv, D = a.D;
    // raw buffers and no std:: calls: inline library code compiled for this ISA could be
    // picked by the linker for the other units too
    thread_local float* scores = nullptr;
    thread_local int cap = 0;
    if (G * kDecodeKeys > cap) {
      delete[] scores;
      scores = new float[G * kDecodeKeys];
      cap = G * kDecodeKeys;
    }
    const int c = t % a.chunks, kvh = (t / a.chunks) % a.Hkv, bi = t / a.chunks / a.Hkv;
    const int j0 = (a.start ? a.start[bi] : 0) + c * kDecodeKeys;
    const int j1 = a.S < j0 + kDecodeKeys ? a.S : j0 + kDecodeKeys;  // one query row: every key
    const float* k = a.k + bi * a.ks[0] + kvh * a.ks[1];
    const float* v = a.v + bi * a.vs[0] + kvh * a.vs[1];
    const float* q = a.q + bi * a.qs[0] + long(kvh) * G * a.qs[1];
    float* part = a.part + long(t) * G * (D + 2);
    for (int g = 0; g < G; g++) part[g * (D + 2)] = -INFINITY, part[g * (D + 2) + 1] = 0.f;
    if (j1 <= j0) {  // past this row's keys
      for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d += W) V::store(part + g * (D + 2) + 2 + d, V::zero());
      return;
    }
    int j = j0;
    for (; j + 4 <= j1; j += 4) {  // four keys' dot products interleaved: four fma chains
      const float* kr = k + long(j) * a.ks[2];
      const long ks = a.ks[2];
      for (int g = 0; g < G; g++) {
        const float* qg = q + g * a.qs[1];
        R c0 = V::zero(), c1 = V::zero(), c2 = V::zero(), c3 = V::zero();
        for (int d = 0; d < D; d += W) {
          const R qv = V::load(qg + d);
          c0 = V::fma(qv, V::load(kr + d), c0);
          c1 = V::fma(qv, V::load(kr + ks + d), c1);
          c2 = V::fma(qv, V::load(kr + 2 * ks + d), c2);
          c3 = V::fma(qv, V::load(kr + 3 * ks + d), c3);
        }
        float* sc = scores + g * kDecodeKeys + (j - j0);
        sc[0] = V::sum(c0) * a.scale, sc[1] = V::sum(c1) * a.scale;
        sc[2] = V::sum(c2) * a.scale, sc[3] = V::sum(c3) * a.scale;
        float& mx = part[g * (D + 2)];
        for (int i = 0; i < 4; i++) mx = sc[i] > mx ? sc[i] : mx;
      }
    }
    for (; j < j1; j++) {
      const float* kr = k + long(j) * a.ks[2];
      for (int g = 0; g < G; g++) {
        const float s = dot(q + g * a.qs[1], kr, D) * a.scale;
        scores[g * kDecodeKeys + (j - j0)] = s;
        float& mx = part[g * (D + 2)];
        mx = s > mx ? s : mx;
      }
    }
    for (int g = 0; g < G; g++)
      part[g * (D + 2) + 1] = exp_sum(scores + g * kDecodeKeys, j1 - j0, part[g * (D + 2)]);
    for (int g = 0; g < G; g++)  // the chunk's value rows stay in L1/L2 across the G heads
      weighted_sum(scores + g * kDecodeKeys, j1 - j0, v + long(j0) * a.vs[2], a.vs[2], D,
                   part + g * (D + 2) + 2);
  }

  // Task t covers rows [r0, r0 + block) of one (batch, head).
  static void task(const AttnArgs& a, int t) {
    if (a.part) return decode(a, t);
    thread_local float* scores = nullptr;
    thread_local long cap = 0;
    if (a.S > cap) {
      delete[] scores;
      scores = new float[a.S];
      cap = a.S;
    }
    const int blocks = (a.L + a.block - 1) / a.block;
    const int bh = t / blocks, r0 = (t % blocks) * a.block;
    const int bi = bh / a.Hq, h = bh % a.Hq;
    for (int i = r0; i < a.L && i < r0 + a.block; i++) row(a, bi, h, i, scores);
  }
};
