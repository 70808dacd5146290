"""The Triton kernels as a `KernelSet`, registered as backend "triton" (the losses: `fastkd.kernel_losses`)."""
from ..kernel_autograd import rkd_functions
from ..kernel_losses import KernelSet, register_backend
from . import attention, ops, rkd

pairwise_sq, angle_sum = rkd_functions(rkd.sq_distances_op, rkd.weighted_diff_op, rkd.angle_sum_op,
                                       rkd.angle_weights_op)
KERNELS = KernelSet(kl_rows=ops.kl_rows, jsd_rows=ops.jsd_rows, dkd_rows=ops.dkd_rows, pairwise_sq=pairwise_sq,
                    angle_sum=angle_sum, channel_mean_pow=attention.channel_mean_pow)
LOSSES = register_backend("triton", KERNELS)
