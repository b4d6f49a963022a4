"""Order-flow images → next-interval realized volatility: CNN and CNN-Aggr vs naive and GARCH.

Lensky & Hao, "Learning to Predict Short-Term Volatility with Order Flow Image Representation",
https://arxiv.org/abs/2304.02472. A simulated stochastic-volatility market
(`jaxblocks.data.order_flow`: trades with sizes and sides, a 10-level book) is cut into
intervals of 64 steps, each rasterised into a 16×16 image (buy/sell volume, bid/ask depth) with
its aggregated features packed alongside. `order_flow_cnn` (the 3-layer CNN) learns the log of
the next interval's realized volatility under the squared-percentage-error loss (the
``volatility`` task); the ``volatility_baselines`` report retrains CNN-Aggr (features
concatenated before the head) and tabulates held-out RMSPE beside the naive forecast and a
GARCH(1,1) fitted on the training period.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "volatility"
    c.model.name = "order_flow_cnn"
    c.model.kwargs = {}
    c.data.name = "order_flow"
    c.data.image_size = 16  # time and price bins; intervals of 4 × 16 = 64 steps
    c.data.num_examples = 4000
    c.batch_size = 64
    c.eval_batch_size = 200
    c.train_steps = 3000
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 100
    c.variants = ({"name": "CNN-Aggr", "overrides": ("model.name='order_flow_cnn_aggr'",)},)
    c.log_every = 250
    c.eval_every = 1000
    c.checkpoint.every_steps = 1000
    c.reports = ("volatility_baselines",)
    if "smoke" in sw:
        apply_smoke(c, train_steps=4, eval_batch_size=16)
        c.model.kwargs = {"widths": (4, 8, 8), "hidden": 8}
        c.data.image_size = 8
        c.data.num_examples = 64
    return c
