"""Distillation methods behind one contract; importing this package registers them all."""

from jaxkd.distill import ce, coss, crd, dist, dkd, fitnet, kd, ofa, pat, rsd  # noqa: F401
from jaxkd.distill.base import (PER_EXAMPLE_COLLECTION, Method, MethodContext, ModelSpec,
                                Outputs, Requirements, TeacherView, Term, create_method, derived,
                                list_methods, method_config, method_entry, method_requirements,
                                register_method, total_loss)

__all__ = ["PER_EXAMPLE_COLLECTION", "Method", "MethodContext", "ModelSpec", "Outputs",
           "Requirements", "TeacherView", "Term", "create_method", "derived", "list_methods",
           "method_config", "method_entry", "method_requirements", "register_method",
           "total_loss"]
