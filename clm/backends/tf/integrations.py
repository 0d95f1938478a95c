"""--report_to on the tf backend: TensorBoard (clm's global-step scalars and sample text through a tf.summary
writer, beside Keras' own TensorBoard callback) and the wandb and mlflow libraries' Keras callbacks, on the main
process only. The other names of the Trainer's list have no Keras callback and are refused (``checks``)."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Optional

from clm.backends.tf.runtime import keras, tf
from clm.errors import ConfigError

if TYPE_CHECKING:
    from clm.config import TrainConfig

# --report_to names the tf backend serves, and the module each needs (a library's own Keras callback).
KERAS_INTEGRATIONS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def keras_integrations(config: "TrainConfig") -> list[str]:
    """The --report_to names besides tensorboard, as the tf backend serves them: a ConfigError for a name
    with no Keras callback or whose library is missing ("all": those of the three that are installed)."""
    if "none" in config.report_to:
        return []
    installed = [name for name, module in KERAS_INTEGRATIONS.items()
                 if name != "tensorboard" and importlib.util.find_spec(module) is not None]
    if "all" in config.report_to:
        return installed
    names = [name for name in config.report_to if name != "tensorboard"]
    for name in names:
        if name not in KERAS_INTEGRATIONS:
            raise ConfigError(f"--report_to {name} has no Keras callback; the tf backend reports to "
                              f"{', '.join(KERAS_INTEGRATIONS)} (or use --backend pt)")
        if name not in installed:
            raise ConfigError(f"--report_to {name} needs the {name} package, which is not installed "
                              f"(pip install {name}), or drop it")
    return names


class Reports:
    """One training run's --report_to. ``writer``: the tf.summary writer of output_dir/runs/<date>_<host> for
    clm's global-step scalars (``trainer.ClmCallback``) and sample generations; None without tensorboard or
    off the main process."""

    def __init__(self, config: "TrainConfig", is_main_process: bool):
        self.config, self.is_main_process = config, is_main_process
        self.log_dir: Optional[str] = None
        self.writer: Any = None
        if config.reports("tensorboard") and is_main_process:
            from clm.reporting import tensorboard_dir

            self.log_dir = tensorboard_dir(config.output_dir)  # one folder for the run: the name holds the time
            self.writer = tf.summary.create_file_writer(self.log_dir)

    def log_samples(self, samples: list[tuple[str, str]], step: int) -> None:
        """Sample generations at an evaluation, as TensorBoard text."""
        if self.writer is None:
            return
        from clm.samples import as_markdown

        with self.writer.as_default(step=step):
            tf.summary.text("eval/samples", as_markdown(samples))
        self.writer.flush()

    def callbacks(self) -> list[Any]:
        """The Keras callbacks: TensorBoard (Keras' own view beside the global-step scalars), wandb, mlflow."""
        config = self.config
        callbacks: list[Any] = []
        if not self.is_main_process:
            return callbacks
        if self.writer is not None:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=self.log_dir, write_graph=False,
                                                         update_freq=config.logging_steps, profile_batch=0))
        for name in keras_integrations(config):
            if name == "wandb":
                import wandb
                from wandb.integration.keras import WandbMetricsLogger

                if wandb.run is None:
                    wandb.init(config=config.to_dict())
                callbacks.append(WandbMetricsLogger(log_freq=config.logging_steps))
            elif name == "mlflow":
                from mlflow.tensorflow import MlflowCallback

                callbacks.append(MlflowCallback(log_every_n_steps=config.logging_steps))
        return callbacks
