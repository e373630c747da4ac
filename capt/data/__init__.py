from .datasets import DATASETS, DataUnavailable, LabeledDataset, load_dataset, parse_data_spec, register_dataset
from .fewshot import few_shot_indices
from .templates import DEFAULT_TEMPLATES, templates_for

__all__ = ["DATASETS", "DataUnavailable", "LabeledDataset", "load_dataset", "parse_data_spec", "register_dataset",
           "few_shot_indices", "DEFAULT_TEMPLATES", "templates_for"]
