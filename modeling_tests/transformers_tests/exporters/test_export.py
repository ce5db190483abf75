"""Stand-in for transformers' ``tests/exporters/test_export.py``: an ``ExportTesterMixin`` written for this project.

Not transformers' file. The transformers 5.25.0 sdist does not ship ``tests/exporters/``, and
``test_modeling_common.py`` derives ``ModelTesterMixin`` from ``ExportTesterMixin``. Like transformers' own export
tests, this one is ``@slow`` (run it with ``RUN_SLOW=1``): it exports every model class with transformers'
``DynamoExporter`` (``torch.export``) and checks the exported program's outputs against eager.
"""

from __future__ import annotations

import copy

import torch

from transformers.testing_utils import require_torch_greater_or_equal, slow, torch_device


class ExportTesterMixin:
    """``torch.export`` through transformers' exporter; outputs equal eager within 1e-4."""

    test_torch_exportable = True

    @slow
    @require_torch_greater_or_equal("2.11")
    def test_torch_export(self):
        from transformers.exporters.configs import DynamoConfig
        from transformers.exporters.exporter_dynamo import DynamoExporter
        from transformers.exporters.utils import get_leaf_tensors

        if not self.test_torch_exportable:
            self.skipTest(reason="the model test class marks its models as not torch.export-able")
        for model_class in self.all_model_classes:
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            inputs = {k: v for k, v in self._prepare_for_class(inputs, model_class).items() if v is not None}
            model = model_class(config).eval().to(torch_device)
            with torch.no_grad():
                eager = get_leaf_tensors(model(**copy.deepcopy(inputs)))
            with self.subTest(model_class.__name__):
                exported = DynamoExporter().export(model, inputs, config=DynamoConfig(dynamic=False))
                with torch.no_grad():
                    got = get_leaf_tensors(exported(**copy.deepcopy(inputs)))
                self.assertTrue(got)
                torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)
