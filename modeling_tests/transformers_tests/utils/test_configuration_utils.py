"""Stand-in for transformers' ``tests/utils/test_configuration_utils.py``: only ``config_common_kwargs``.

Written for this project (the 5.25.0 sdist does not ship the file). ``ConfigTester.check_config_arguments_init``
builds a config from these keyword arguments and checks that every one of them was kept. They are the fields
that transformers' ``PreTrainedConfig`` itself declares (configuration_utils.py, "Common attributes for all
models" and "Fine-tuning task arguments"), each set to a value other than its default so that a config which
drops or overwrites one is caught.
"""

config_common_kwargs = {
    "architectures": ["SomeArchitecture"],
    "output_hidden_states": True,
    "return_dict": False,
    "dtype": "float16",  # ConfigTester compares `config.dtype` with torch.float16
    "chunk_size_feed_forward": 5,
    "id2label": {0: "label_a", 1: "label_b"},
    "label2id": {"label_a": 0, "label_b": 1},
    "problem_type": "single_label_classification",
}
