"""scikit-learn linear models over the current layer's experts and the previous token's experts.

Features per (token, source layer l, slot): the current layer's experts (gate-weighted multi-hot,
E columns) and the previous token's experts at the target layer (E columns), as a sparse matrix.
Targets are multi-label (K of E); each row is repeated once per true expert with that expert as the
class, so a multinomial model estimates how often each expert is among the chosen ones. One model
per (slot, source layer). Only the coefficients are kept (torch arrays), so loading runs no code and
online prediction is one small matmul.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from predictors.base import Predictor, RoutingState, multi_hot, normalized, trace_tensors
from predictors.param_limits import Limit
from predictors.dataset import slot_targets
from predictors.traces import RoutingTrace


def features(cur_ids, cur_w, prev_ids, E: int) -> torch.Tensor:
    """[N, K] current-layer ids/weights, [N, K] previous token's target-layer ids -> float [N, 2E]."""
    return torch.cat([multi_hot(cur_ids, E, normalized(cur_w) + 1.0), multi_hot(prev_ids, E)], -1)


class LinearPredictor(Predictor):
    """Shared plumbing: gather rows per (slot, layer), fit an sklearn model, keep coef [D, L, E, F]."""

    PARAMS = frozenset({"max_tokens"})  # fit: tokens sampled to fit on (3000; 0: all)
    PARAM_LIMITS = dict(max_tokens=Limit("int", ge=0))

    def _fit_one(self, X: sp.csr_matrix, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(coef [C, F], intercept [C], classes [C]) of one model fitted on rows X, labels y."""
        raise NotImplementedError(f"{type(self).__name__} must implement _fit_one")

    def fit(self, traces: list[RoutingTrace]) -> "LinearPredictor":
        self.check_traces(traces)
        x, w, px, _ = (torch.cat(p) for p in zip(*(trace_tensors(t) for t in traces)))
        tgt = torch.cat([slot_targets(t, self.lookahead) for t in traces])  # [T, L, D, K]
        cap = int(self.params.get("max_tokens", 3000))  # sklearn's 64-class fits are the slow part
        if cap and x.shape[0] > cap:
            keep = torch.from_numpy(np.sort(np.random.default_rng(0).choice(x.shape[0], cap, replace=False)))
            x, w, px, tgt = x[keep], w[keep], px[keep], tgt[keep]
        with threadpool_limits(limits=1), warnings.catch_warnings():  # one BLAS thread: small fits only thrash
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is a deliberate time budget
            self._fit_all(x, w, px, tgt)
        self.fitted = True
        return self

    def _fit_all(self, x, w, px, tgt) -> None:
        E, L, D = self.num_experts, self.num_layers, self.slots
        self.coef = torch.zeros(D, L, E, 2 * E)
        self.intercept = torch.full((D, L, E), -30.0)
        for j in range(D):
            for l in range(L):
                t = l if self.next_token else l + 1 + j
                if t >= L:
                    continue
                y = tgt[:, l, j]  # [T, K]
                ok = y[:, 0] >= 0
                if ok.sum() == 0:
                    continue
                X = features(x[ok, l], w[ok, l], px[ok, t], E).numpy()
                K = y.shape[1]
                Xr = sp.csr_matrix(np.repeat(X, K, axis=0))
                yr = y[ok].reshape(-1).numpy()
                if len(np.unique(yr)) == 1:  # a layer that always routes to one expert (top-1): no model
                    # to fit (LogisticRegression refuses one class); that expert scores 0, the others -30
                    self.intercept[j, l, int(yr[0])] = 0.0
                    continue
                coef, icpt, classes = self._fit_one(Xr, yr)
                self.coef[j, l, classes] = torch.from_numpy(coef).float()
                self.intercept[j, l, classes] = torch.from_numpy(icpt).float()

    @torch.inference_mode()
    def predict(self, state: RoutingState, layer: int) -> torch.Tensor:
        self.check(state, layer)
        out = torch.zeros(state.batch_size, self.slots, self.num_experts)
        for j, t in enumerate(self.target_layers(layer)):
            if t < self.num_layers:
                X = features(state.experts[:, layer], state.weights[:, layer], state.prev_experts[:, t], self.num_experts)
                out[:, j] = torch.addmm(self.intercept[j, layer], X, self.coef[j, layer].T)
        return out

    def arrays(self):
        return {"coef": self.coef, "intercept": self.intercept}

    def array_shapes(self):
        D, L, E = self.slots, self.num_layers, self.num_experts
        return {"coef": (D, L, E, 2 * E), "intercept": (D, L, E)}

    def load_arrays(self, arrays):
        self.coef, self.intercept = arrays["coef"], arrays["intercept"]
        self.fitted = True


class LogRegPredictor(LinearPredictor):
    """Multinomial logistic regression (lbfgs), one per (slot, source layer)."""

    name = "logreg"
    PARAMS = frozenset({"C", "max_iter"})  # inverse regularization (1.0), lbfgs iterations (50)
    PARAM_LIMITS = dict(C=Limit("float", gt=0), max_iter=Limit("int", ge=1))

    def _fit_one(self, X, y):
        from sklearn.linear_model import LogisticRegression

        m = LogisticRegression(C=float(self.params.get("C", 1.0)), max_iter=int(self.params.get("max_iter", 50)), tol=1e-3)
        m.fit(X, y)
        if len(m.classes_) == 2:  # binary: sklearn keeps one row; expand to two classes
            return np.stack([-m.coef_[0], m.coef_[0]]) / 2, np.array([-m.intercept_[0], m.intercept_[0]]) / 2, m.classes_
        return m.coef_, m.intercept_, m.classes_


class SGDPredictor(LinearPredictor):
    """Logistic loss by SGD with partial_fit over chunks of rows: the model that can keep learning online."""

    name = "sgd"
    PARAMS = frozenset({"alpha", "eta0", "chunk", "epochs"})  # 1e-4, learning rate 0.05, 4096 rows per partial_fit, 1
    PARAM_LIMITS = dict(alpha=Limit("float", ge=0), eta0=Limit("float", gt=0), chunk=Limit("int", ge=1),
                        epochs=Limit("int", ge=1))

    def _fit_one(self, X, y):
        from sklearn.linear_model import SGDClassifier

        m = SGDClassifier(
            loss="log_loss", alpha=float(self.params.get("alpha", 1e-4)), random_state=0,
            learning_rate="constant", eta0=float(self.params.get("eta0", 0.05)),
        )
        classes = np.arange(self.num_experts)
        chunk = int(self.params.get("chunk", 4096))
        order = np.random.default_rng(0).permutation(X.shape[0])
        for _ in range(int(self.params.get("epochs", 1))):
            for s in range(0, X.shape[0], chunk):
                rows = order[s : s + chunk]
                m.partial_fit(X[rows], y[rows], classes=classes)
        if len(classes) == 2:  # binary: sklearn keeps one row (class 1's); expand to two, as logreg does
            return np.stack([-m.coef_[0], m.coef_[0]]) / 2, np.array([-m.intercept_[0], m.intercept_[0]]) / 2, classes
        return m.coef_, m.intercept_, classes
