// Must not compile: the chain helpers take the same storage types as the losses.
#include <moereg/chain.hpp>
int main() {
  int p[4] = {1, 0, 0, 1}, dp[4] = {}, dz[4] = {};
  moereg::softmax_backward(moereg::routing_view<int>(p, 2, 2), moereg::matrix_view<const int>(dp, 2, 2),
                           moereg::matrix_view<int>(dz, 2, 2));
  return dz[0];
}
