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
    float total = 0.f;
    for (int j = j0; j < lim; j++) {
      float p = expf(scores[j] - mx);  // libm call: no inline code shared across ISA units
      scores[j] = p;
      total += p;
    }
    for (int d = 0; d < a.D; d += W) V::store(out + d, V::zero());
    for (int j = j0; j < lim; j++) {
      R p = V::set1(scores[j]);
      const float* vr = v + long(j) * a.vs[2];
      for (int d = 0; d < a.D; d += W) V::store(out + d, V::fma(p, V::load(vr + d), V::load(out + d)));
    }
    R inv = V::set1(lim > j0 ? 1.f / total : 0.f);  // a padding query sees no key: zeros
    for (int d = 0; d < a.D; d += W) V::store(out + d, V::mul(V::load(out + d), inv));
  }

  // Task t covers rows [r0, r0 + block) of one (batch, head).
  static void task(const AttnArgs& a, int t) {
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
