"""The pipeline runner: a Model whose units sit on several devices, one stage after the other.

A placed model is model/model.py's Model with a ``PipelinePlace`` instead of ``OneDevice``: the same forward,
cached decode, chunked prefill and generate (greedy, sampling, MTP speculative decoding), computing the same
ops in the same order, so its logits equal the single-device model's bit for bit. What changes:

- each unit (embedding, layer i, head = norm_f + lm_head, mtp) runs on its planned device, under
  ``devices.use(k)`` and with that device's backend;
- only activations cross a stage boundary: ``hop`` moves the hidden state (and the MTP head's inputs) to the
  next unit's device with ``devices.to``, which counts every transfer; an operand left on the wrong device
  is an error naming both devices (VirtualDevices, and the CuPy launchers), never a silent copy;
- every layer's cache lives on its layer's device, K/V preallocated for the planned ``max_len``.
"""

from __future__ import annotations

from ..backends import get_backend
from ..model.model import Model

UNITS_OF_HEAD = ("norm_f", "lm_head")


def unit_params(params, unit):
    """The part of a parameter tree (model/weights.py) one unit owns: a dict (a layer, the MTP head, the head's
    {norm_f, lm_head}) or the embedding table."""
    if unit == "embedding":
        return params["embeddings"]
    if unit == "head":
        return {key: params[key] for key in UNITS_OF_HEAD}
    if unit == "mtp":
        return params.get("mtp")
    return params["layers"][int(unit.split()[1])]


class PipelinePlace:
    """Units on devices (the four methods of model/model.py's OneDevice): ``backend(unit)`` is its device's
    backend, ``use(unit)`` makes that device current, ``hop(x, unit)`` moves an activation there."""

    def __init__(self, devices, unit_device, backend="numpy"):
        self.devices, self.unit_device = devices, dict(unit_device)
        if backend == "numpy":
            # the reference, each device with a backend whose arrays (and allocations) are on that device
            self._backends = {k: devices.backend(k) for k in set(self.unit_device.values())}
        else:
            # one GPU backend: CuPy allocates and launches on the current device (``use``)
            shared = get_backend(backend)
            self._backends = {k: shared for k in set(self.unit_device.values())}
        self.hops = 0

    def device(self, unit):
        return self.unit_device[unit]

    def backend(self, unit):
        return self._backends[self.unit_device[unit]]

    def use(self, unit):
        return self.devices.use(self.unit_device[unit])

    def hop(self, x, unit):
        k = self.unit_device[unit]
        if self.devices.device_of(x) == k:
            return x
        self.hops += 1
        return self.devices.to(k, x, name=f"hop to {unit}")

    def xp(self, unit):
        return self.devices.namespace(self.unit_device[unit])


class PlacedModel(Model):
    """A Model placed over several devices by a Placement (plan.py); build it with loader.load_placed."""

    def __init__(self, cfg, params, place, placement, **model_options):
        super().__init__(cfg, params, place=place, **model_options)
        self.placement, self.devices = placement, place.devices

    def new_cache(self, batch=1, kv_capacity=None):
        """Layer states on their layers' devices, K/V preallocated for the planned context length."""
        return super().new_cache(batch, kv_capacity or self.placement.run.max_len)

    def __repr__(self):
        stages = ", ".join(f"{s.device}: {s.units[0].short}-{s.units[-1].short}" for s in self.placement.stages
                           if s.units)
        return super().__repr__()[:-1] + f", stages [{stages}])"
