"""One spec per table of the MDT paper: its numbers, how to recognise each row's runs, its layout.

The numbers are SPEC section 5 (FID-50K, 250 DDPM steps, no guidance unless -G); the sFID / IS /
precision / recall columns of Tables 2-4 and Table 2's unguided DiT-XL/2 row are the paper's own
table text (seed paper, Tables 2-4), which SPEC section 5 points to.

A ``Row`` matches a run when every ``match`` column of the run's config columns
(mdtzoo.tables.ginparse.config_columns) equals the row's value; the run's evaluation at ``step``
(guided or not, as ``guided`` says) fills the row. Ablation rows list the *whole* MDT-S/2
baseline plus their change, so a run matches exactly the rows of its configuration (the
baseline run fills every baseline row: 50.26 in Tables 3, 4 and 5a-i).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

ADM_METRICS = ("fid", "sfid", "is", "precision", "recall")
METRIC_LABELS = {
    "fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Prec.", "recall": "Rec.",
    "heldout_mse": "held-out MSE", "heldout_vb": "held-out VB", "relation_acc": "relation acc.",
    "relation_score": "relation score",
}
# Direction of "better", to say whether ours and the paper's agree on the order of rows.
HIGHER_IS_BETTER = {"is", "precision", "recall", "relation_acc", "relation_score"}
# Debug runs use XS models; `mdtzoo table --substitute` (or this map) puts them in the S/2 rows.
DEBUG_SUBSTITUTE = {"mdt_xs2": "mdt_s2", "dit_xs2": "dit_s2"}


@dataclass(frozen=True)
class Row:
    """One row of a paper table.

    label: index values (``("MDT-S/2", "400")``); name: a short id (``mask_ratio_0.5``);
    match: config column -> required value; paper: metric -> the paper's number;
    config: the experiments/-relative gin file that trains it; step: the evaluated step;
    guided: evaluated with classifier-free guidance (-G); sampling: Table 2's sampling file;
    debug: bindings on the table's debug file for the CPU analogue (None: no analogue).
    """

    label: tuple[str, ...]
    name: str
    match: Mapping[str, Any]
    paper: Mapping[str, float]
    config: str
    step: int
    guided: bool = False
    sampling: str | None = None
    debug: tuple[str, ...] | None = ()


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    index: tuple[str, ...]
    metrics: tuple[str, ...]
    rows: tuple[Row, ...]
    debug_config: str | None = None
    sweep: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    # What `make_table` shows when not told: metrics (default: ``metrics``, the paper's) and step
    # (default None: each row's ``step``; "last" for runs whose length is not the paper's).
    default_metrics: tuple[str, ...] = ()
    default_step: int | str | None = None

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def mdt(model: str, **changes) -> dict:
    """The paper's MDT v1 configuration of ``model`` (section 4.1), with ``changes``."""
    base = {
        "model": model, "masking": "random", "masking.random.ratio": 0.3, "decode_layer": 2,
        "symmetric": False, "interp": "side", "interp.side.num_blocks": 1, "interp.side.shortcut": True,
        "interp.side.pos_embed": "sincos_learnable", "interp.side.mask_token": True,
        "pos_embed": "sincos_learnable", "rel_pos": "relbias", "long_skips": False, "dense_skips": False,
        "train.passes": "both", "train.masked_loss_on": "all",
    }
    if changes.get("interp") == "none":  # interp.none has no blocks and no shortcut
        base = {k: v for k, v in base.items() if not k.startswith("interp.side.")}
    return {**base, **changes}


def dit(model: str) -> dict:
    return {"model": model, "pos_embed": "sincos", "rel_pos": "none", "masking": "none", "interp": None,
            "decode_layer": 0, "symmetric": False, "train.passes": "full"}


def _adm(values: tuple[float, ...]) -> dict[str, float]:
    return dict(zip(ADM_METRICS, values))


# ---------------------------------------------------------------------------------- Table 1
_T1 = [  # (label, preset, steps (k), FID)
    ("DiT-S/2", "dit_s2", 400, 68.40),
    ("MDT-S/2", "mdt_s2", 300, 57.01), ("MDT-S/2", "mdt_s2", 400, 53.46),
    ("MDT-S/2", "mdt_s2", 2000, 44.14), ("MDT-S/2", "mdt_s2", 3500, 41.37),
    ("DiT-B/2", "dit_b2", 400, 43.47),
    ("MDT-B/2", "mdt_b2", 400, 34.33), ("MDT-B/2", "mdt_b2", 3500, 20.45),
    ("DiT-XL/2", "dit_xl2", 400, 19.47), ("DiT-XL/2", "dit_xl2", 2352, 10.67), ("DiT-XL/2", "dit_xl2", 7000, 9.62),
    ("MDT-XL/2", "mdt_xl2", 400, 16.42), ("MDT-XL/2", "mdt_xl2", 1300, 9.60), ("MDT-XL/2", "mdt_xl2", 3500, 6.65),
]
_T1_DEBUG = {"mdt_s2": (), "dit_s2": ("build.model = @models.dit_xs2",)}
TABLE1 = TableSpec(
    name="table1",
    title="Table 1. DiT vs MDT over model sizes and training steps, ImageNet 256x256 (FID-50K). "
          "DiT numbers are the DiT paper's.",
    index=("Method", "Steps (k)"),
    metrics=("fid",),
    rows=tuple(
        Row((label, str(k)), f"{preset}_{k}k", dit(preset) if preset.startswith("dit") else mdt(preset),
            {"fid": fid}, f"paper/table1/{preset}.gin", k * 1000, debug=_T1_DEBUG.get(preset))
        for label, preset, k, fid in _T1
    ),
    debug_config="debug/table1.gin",
    sweep="paper/table1.sweep",
)

# ---------------------------------------------------------------------------------- Table 2
_T2 = [  # (label, preset, steps (k), guided, FID, sFID, IS, Prec, Rec)
    ("DiT-XL/2", "dit_xl2", 7000, False, 9.62, 6.85, 121.50, 0.67, 0.67),
    ("MDT-XL/2", "mdt_xl2", 2500, False, 7.41, 4.95, 121.22, 0.72, 0.64),
    ("MDT-XL/2", "mdt_xl2", 3500, False, 6.46, 4.92, 131.70, 0.72, 0.63),
    ("MDT-XL/2", "mdt_xl2", 6500, False, 6.23, 5.23, 143.02, 0.71, 0.65),
    ("DiT-XL/2-G", "dit_xl2", 7000, True, 2.27, 4.60, 278.24, 0.83, 0.57),
    ("MDT-XL/2-G", "mdt_xl2", 2500, True, 2.15, 4.52, 249.27, 0.82, 0.58),
    ("MDT-XL/2-G", "mdt_xl2", 3500, True, 2.02, 4.46, 263.77, 0.82, 0.60),
    ("MDT-XL/2-G", "mdt_xl2", 6500, True, 1.79, 4.57, 283.01, 0.81, 0.61),
]


def _t2_sampling(preset: str, guided: bool) -> str:
    if not guided:
        return "paper/table2/sampling.gin"
    return "paper/table2/sampling_cfg_dit.gin" if preset.startswith("dit") else "paper/table2/sampling_cfg.gin"


TABLE2 = TableSpec(
    name="table2",
    title="Table 2. Class-conditional ImageNet 256x256, MDT-XL/2 and DiT-XL/2 (-G: classifier-free guidance; "
          "MDT power-cosine s=3.8 pow=4, DiT constant s=1.5).",
    index=("Method", "Steps (k)"),
    metrics=ADM_METRICS,
    rows=tuple(
        Row((label, str(k)), f"{preset}{'_g' if g else ''}_{k}k", dit(preset) if preset.startswith("dit") else mdt(preset),
            _adm(values), f"paper/table1/{preset}.gin", k * 1000, guided=g, sampling=_t2_sampling(preset, g),
            debug=None)
        for label, preset, k, g, *values in _T2
    ),
    sweep="paper/table2.sweep",
    notes=("Runs are Table 1's dit_xl2 / mdt_xl2; each checkpoint is evaluated with and without guidance.",),
)

# ---------------------------------------------------------------------------------- Table 3
_T3 = {0.1: (51.60, 10.23, 26.65, 0.44, 0.60), 0.2: (51.44, 10.09, 26.75, 0.44, 0.58),
       0.3: (50.26, 10.08, 27.61, 0.45, 0.60), 0.4: (50.88, 10.21, 27.44, 0.45, 0.60),
       0.5: (51.57, 9.92, 27.14, 0.44, 0.60), 0.6: (53.20, 10.36, 26.55, 0.44, 0.61),
       0.7: (52.90, 10.03, 26.51, 0.44, 0.61), 0.8: (53.73, 10.15, 25.55, 0.43, 0.61)}
TABLE3 = TableSpec(
    name="table3",
    title="Table 3. Effect of the masking ratio. MDT-S/2 trained for 600k iterations.",
    index=("Mask ratio",),
    metrics=ADM_METRICS,
    rows=tuple(
        Row((str(r),), f"mask_ratio_{r}", mdt("mdt_s2", **{"masking.random.ratio": r}), _adm(v),
            f"paper/table3/mask_ratio_{r}.gin", 600_000, debug=(f"masking.random.ratio = {r}",))
        for r, v in _T3.items()
    ),
    debug_config="debug/table3.gin",
    sweep="paper/table3.sweep",
)

# ---------------------------------------------------------------------------------- Table 4
_T4 = {0: (51.05, 9.97, 27.31, 0.44, 0.60), 1: (50.96, 9.90, 27.63, 0.45, 0.60),
       2: (50.26, 10.08, 27.61, 0.45, 0.60), 4: (51.67, 10.12, 26.91, 0.45, 0.60),
       6: (52.64, 10.36, 26.46, 0.44, 0.60)}
TABLE4 = TableSpec(
    name="table4",
    title="Table 4. Position of the side-interpolator (before the last N of 12 blocks). MDT-S/2, 600k iterations.",
    index=("Decoder pos.",),
    metrics=ADM_METRICS,
    rows=tuple(
        Row((f"Last{n}",), f"last{n}", mdt("mdt_s2", decode_layer=n), _adm(v), f"paper/table4/last{n}.gin",
            600_000, debug=(f"models.mdt_xs2.decode_layer = {n}",))
        for n, v in _T4.items()
    ),
    debug_config="debug/table4.gin",
    sweep="paper/table4.sweep",
)

# ---------------------------------------------------------------------------------- Table 5
_YES, _NO = "✓", "×"
_T5 = [  # (file name, part, setting, FID, config changes, debug bindings)
    ("a_asymmetric", "(a) asymmetric structure", _YES, 50.26, {}, ()),
    ("a_symmetric", "(a) asymmetric structure", _NO, 51.56, {"symmetric": True},
     ("models.mdt_xs2.symmetric = True",)),
    ("b_side_interp", "(b) side-interpolator", _YES, 50.26, {}, ()),
    ("b_no_interp", "(b) side-interpolator", _NO, 51.60, {"interp": "none", "interp.none.pos_embed": "sincos_learnable"},
     ("models.mdt_xs2.interp = @interp.none", "interp.none.pos_embed = 'sincos_learnable'")),
    ("c_shortcut", "(c) masked shortcut", _YES, 50.26, {}, ()),
    ("c_no_shortcut", "(c) masked shortcut", _NO, 50.91, {"interp.side.shortcut": False},
     ("interp.side.shortcut = False",)),
    ("d_full_masked", "(d) latent type", "Full+Masked", 50.26, {}, ()),
    ("d_full", "(d) latent type", "Full", 52.30, {"train.passes": "full"}, ("train.passes = 'full'",)),
    ("d_masked", "(d) latent type", "Masked", 76.63, {"train.passes": "masked"}, ("train.passes = 'masked'",)),
    ("e_loss_all", "(e) supervised parts", "All", 50.26, {}, ()),
    ("e_loss_removed", "(e) supervised parts", "Masked", 58.35, {"train.masked_loss_on": "removed"},
     ("train.masked_loss_on = 'removed'",)),
    ("f_side_blocks1", "(f) side-interpolator blocks", "1", 50.26, {}, ()),
    ("f_side_blocks2", "(f) side-interpolator blocks", "2", 51.77, {"interp.side.num_blocks": 2},
     ("interp.side.num_blocks = 2",)),
    ("f_side_blocks3", "(f) side-interpolator blocks", "3", 51.96, {"interp.side.num_blocks": 3},
     ("interp.side.num_blocks = 3",)),
    ("g_interp_pos", "(g) pos. embed in side-interp.", _YES, 50.26, {}, ()),
    ("g_no_interp_pos", "(g) pos. embed in side-interp.", _NO, 51.58, {"interp.side.pos_embed": "none"},
     ("interp.side.pos_embed = 'none'",)),
    ("h_learnable_pos", "(h) learnable pos. embed", _YES, 50.26, {}, ()),
    ("h_fixed_pos", "(h) learnable pos. embed", _NO, 50.80, {"pos_embed": "sincos"},
     ("models.mdt_xs2.pos_embed = 'sincos'",)),
    ("i_relbias", "(i) relative pos. bias", _YES, 50.26, {}, ()),
    ("i_no_relbias", "(i) relative pos. bias", _NO, 53.56, {"rel_pos": "none"}, ("models.mdt_xs2.rel_pos = 'none'",)),
]
TABLE5 = TableSpec(
    name="table5",
    title="Table 5. Ablations of MDT-S/2, 600k iterations (FID-50K).",
    index=("Ablation", "Setting"),
    metrics=("fid",),
    rows=tuple(
        Row((part, setting), name, mdt("mdt_s2", **changes), {"fid": fid}, f"paper/table5/{name}.gin", 600_000,
            debug=debug)
        for name, part, setting, fid, changes, debug in _T5
    ),
    debug_config="debug/table5.gin",
    sweep="paper/table5.sweep",
    notes=("(d) The paper aligns the cost of Full / Masked with Full+Masked without saying how; "
           "our configs keep 600k steps for all three.",),
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (TABLE1, TABLE2, TABLE3, TABLE4, TABLE5)}


def table_spec(name: str) -> TableSpec:
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    return TABLES[name]
