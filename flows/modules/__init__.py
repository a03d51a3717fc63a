"""Riemannian modules: leaf operators, the module graph read from any ``nn.Module``, and the backward sweep of
costates and metric factors (MATH.md §2.2–2.4).

Layout (one concept per file):

    activations.py    elementwise activations (A = diag σ')
    linear.py         Linear: structured Gram, K g and Kᵀu without K
    conv.py           Conv1d/Conv2d: K from unfolded patches, input rows by transposed convolution
    normalisation.py  LayerNorm/GroupNorm affine parameters
    embedding.py      Embedding: K by scatter-add into the vocabulary
    shape.py          reshapes and permutations of each sample (flatten, view, transpose, …): rows by the inverse
                      permutation
    generic.py        any node by per-sample vjps (torch.func): attention, normalisation, embeddings, glue
    composition.py    Chain (series), Parallel (direct sum), Function (any per-sample map with parameters)
    manifolds.py      retractions: the parameter manifold of a module
    graph.py          reading a model as a DAG with torch.fx: module, parameter and glue nodes, in graph order
    sweep.py          the backward sweep of costates and factor rows, summed over consumers
    chain.py          structured sweeps of Linear/activation chains: Hessian–vector products (R-operator,
                      Pearlmutter) and weighted per-sample gradients of an ensemble

Public surface: ``read(model) → ModuleGraph`` (``.nodes``, ``.module_nodes``, ``.forward(params, x) → Trace``),
``backward(graph, trace, rows, visit)``, ``costates(problem, θ)``, the module classes and the retractions.
"""

from flows.modules.activations import ACTIVATIONS, Activation, ActivationOps, ReLU, Sigmoid, Softplus, Tanh
from flows.modules.chain import LinearChain, chain_hessian_products, linear_chain
from flows.modules.composition import Chain, Function, Parallel
from flows.modules.conv import ConvOps
from flows.modules.embedding import EmbeddingOps
from flows.modules.generic import GenericOps
from flows.modules.graph import ModuleGraph, Node, Trace, read
from flows.modules.linear import Linear, LinearOps
from flows.modules.manifolds import retract, retraction, sphere_retract
from flows.modules.normalisation import NormOps
from flows.modules.shape import ShapeOps
from flows.modules.sweep import Costate, backward, costates, node_gradient

__all__ = ["ACTIVATIONS", "Activation", "ActivationOps", "Chain", "ConvOps", "Costate", "EmbeddingOps", "Function",
           "GenericOps", "Linear", "LinearChain", "LinearOps", "ModuleGraph", "Node", "NormOps", "Parallel", "ReLU",
           "ShapeOps", "Sigmoid", "Softplus", "Tanh", "Trace", "backward", "chain_hessian_products", "costates",
           "linear_chain", "node_gradient", "read", "retract", "retraction", "sphere_retract"]
