"""Built-in data: a simulated industrial process, generated deterministically.

``cstr(rows, seed)`` simulates a continuous stirred-tank reactor running the exothermic
first-order reaction A -> B with Arrhenius kinetics and a cooling jacket:

    dC_A/dt = (C_Af - C_A) / tau - k(T) C_A,          k(T) = k0 exp(-E / (R T))
    dT/dt   = (T_f - T) / tau + (-dH) / (rho cp) k(T) C_A - UA(q_c) / (rho cp V) (T - T_c)
    UA(q_c) = UA_max q_c / (q_c + q_half)             (jacket heat transfer rises with coolant flow)

Each row draws operating conditions (feed temperature T_f, feed concentration C_Af,
coolant flow q_c, coolant inlet temperature T_c, residence time tau), integrates the
balances from the feed state for 10 residence times (semi-implicit Euler, so even the
hot-running rows settle) and records the outlet temperature T and the conversion
1 - C_A / C_Af, with sensor noise. Parameters are textbook-scale values for a small
liquid-phase reactor.
"""
from __future__ import annotations

import numpy as np

FEATURES = ["feed_temp_K", "feed_conc_mol_L", "coolant_flow_L_min", "coolant_temp_K", "residence_time_min"]
TARGETS = ["outlet_temp_K", "conversion"]

_K0 = 7.2e10        # 1/min
_E_OVER_R = 8750.0  # K
_DH_OVER_RHOCP = 209.0   # K L / mol  ((-dH) / (rho cp), dH = -5e4 J/mol, rho cp = 239 J/(L K))
_UA_MAX_OVER_RHOCPV = 2.5  # 1/min at full coolant flow
_Q_HALF = 8.0       # L/min


def cstr(rows: int = 20000, seed: int = 0, noise: bool = True, jacket: float = 1.0):
    """Returns (X, Y, feature_names, target_names): X (rows, 5) and Y (rows, 2) float32 arrays.
    ``jacket``: the cooling jacket's heat transfer as a fraction of a clean one's (a fouled
    jacket: below 1), for reactors that differ (``units``)."""
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"cstr: rows must be a positive int, got {rows!r}")
    if not 0 < jacket <= 2:
        raise ValueError(f"cstr: jacket must be in (0, 2], got {jacket!r}")
    rng = np.random.default_rng(seed)
    t_f = rng.uniform(330.0, 370.0, rows)
    c_af = rng.uniform(0.5, 1.5, rows)
    q_c = rng.uniform(1.0, 30.0, rows)
    t_c = rng.uniform(280.0, 310.0, rows)
    tau = rng.uniform(0.5, 3.0, rows)

    ua = jacket * _UA_MAX_OVER_RHOCPV * q_c / (q_c + _Q_HALF)
    c_a, temp = c_af.copy(), t_f.copy()
    steps = 400
    dt = 10.0 * tau / steps
    for _ in range(steps):
        k = _K0 * np.exp(-_E_OVER_R / temp)
        # Implicit in the stiff terms (reaction for C_A, jacket and flow for T): stable at any dt.
        c_a = (c_a + dt * c_af / tau) / (1.0 + dt / tau + dt * k)
        heat = _DH_OVER_RHOCP * k * c_a
        temp = (temp + dt * (t_f / tau + heat + ua * t_c)) / (1.0 + dt / tau + dt * ua)
        temp = np.minimum(temp, 700.0)  # a runaway is recorded as a hot, finished reactor, not an overflow
    conversion = 1.0 - c_a / c_af
    if noise:
        temp = temp + rng.normal(0.0, 0.3, rows)          # thermocouple, K
        conversion = conversion + rng.normal(0.0, 0.005, rows)  # analyser
    x = np.stack([t_f, c_af, q_c, t_c, tau], axis=1).astype(np.float32)
    y = np.stack([temp, conversion], axis=1).astype(np.float32)
    return x, y, list(FEATURES), list(TARGETS)


def units(count: int, rows: int = 20000, seed: int = 0, noise: bool = True):
    """``count`` reactor units, labelled R-101, R-102, ..., each a cstr() whose jacket is more
    fouled than the one before (100%, 85%, 70%, ...; at least 25%): the same inputs give other
    outputs on each unit, as one model per unit (``--group-by unit``) should learn. Returns
    (X, Y, labels, feature_names, target_names): the rows of the units interleaved, labels a
    list of strings."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"units: count must be a positive int, got {count!r}")
    if not isinstance(rows, int) or rows < count:
        raise ValueError(f"units: rows must be an int of at least count={count}, got {rows!r}")
    parts = [cstr(rows // count + (k < rows % count), seed=seed + k, noise=noise, jacket=max(0.25, 1.0 - 0.15 * k))
             for k in range(count)]
    order = np.argsort(np.concatenate([np.arange(len(p[0])) * count + k for k, p in enumerate(parts)]), kind="stable")
    x = np.concatenate([p[0] for p in parts])[order]
    y = np.concatenate([p[1] for p in parts])[order]
    labels = [f"R-{101 + k}" for k, p in enumerate(parts) for _ in range(len(p[0]))]
    return x, y, [labels[i] for i in order], list(FEATURES), list(TARGETS)
