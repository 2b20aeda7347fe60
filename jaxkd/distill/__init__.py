"""Distillation methods behind one contract; importing this package registers them all."""

from jaxkd.distill import (ce, coss, crd, dist, dkd, fitnet, kd, maps, ofa, pat,  # noqa: F401
                          relational, rsd, seed, srrl)
from jaxkd.distill.base import (PER_EXAMPLE_COLLECTION, Method, MethodContext, ModelSpec,
                                Outputs, Requirements, TeacherView, Term, batch_groups,
                                create_method, derived, list_methods, method_config,
                                method_entry, method_requirements, register_method, total_loss)
from jaxkd.distill.feature import FeatureMethod, register_feature_method

__all__ = ["PER_EXAMPLE_COLLECTION", "FeatureMethod", "Method", "MethodContext", "ModelSpec",
           "Outputs", "Requirements", "TeacherView", "Term", "batch_groups", "create_method",
           "derived", "list_methods", "method_config", "method_entry", "method_requirements",
           "register_feature_method", "register_method", "total_loss"]
