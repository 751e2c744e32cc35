"""3D Gaussians as the service passes them around, and their geometric post-processing."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Gaussians:
    """N Gaussians in one coordinate frame (OpenCV axes: x right, y down, z forward).

    All tensors share one device; float32 unless stated.
    """

    means: torch.Tensor  # (N, 3)
    scales: torch.Tensor  # (N, 3) standard deviations along the principal axes (> 0)
    quaternions: torch.Tensor  # (N, 4) rotation as (w, x, y, z), not necessarily unit length
    colors: torch.Tensor  # (N, 3) linear RGB in 0..1
    opacities: torch.Tensor  # (N,) in 0..1

    def __len__(self) -> int:
        return self.means.shape[0]

    def to(self, device: torch.device | str) -> Gaussians:
        return Gaussians(*(t.to(device) for t in self.tensors()))

    def contiguous(self) -> Gaussians:
        """The same Gaussians in C-order tensors (each copied only if it is a strided view).

        Writers call this first: PyTorch's vectorised and strided kernels for one op may differ
        in the last bit, and a file must not depend on how its tensors were laid out.
        """
        return Gaussians(*(t.contiguous() for t in self.tensors()))

    def index(self, keep: torch.Tensor) -> Gaussians:
        """The subset selected by a boolean mask or an index tensor."""
        return Gaussians(*(t[keep] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.means, self.scales, self.quaternions, self.colors, self.opacities)


# The maths below works on tuples of (N,) tensors, one per component of a vector or matrix: plain
# elementwise kernels over contiguous memory, several times faster on the CPU than batched
# (N, 3, 3) products, cross products and gathers, and as fast on a GPU. Branches are blends with
# 0/1 float masks: on the CPU, bool masks and torch.where cost ~10x an elementwise product.
Vec3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Mat3 = tuple[Vec3, Vec3, Vec3]  # rows
Sym3 = tuple[torch.Tensor, ...]  # upper triangle (xx, xy, xz, yy, yz, zz)
Quat = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (w, x, y, z)

# Gaussians per step on the CPU: a step's few hundred temporaries then stay in cache and the
# allocator recycles them instead of faulting in fresh pages for every op (~2x faster).
_CPU_CHUNK = 1 << 16


def postprocess(
    gaussians_ndc: Gaussians, *, focal_length_px: float, image_width: int, image_height: int
) -> Gaussians:
    """The network's NDC Gaussians in metric camera space, in float32: what the pipeline calls.

    The network may run in half precision; the covariance factorization needs float32.
    """
    with torch.no_grad():
        return unproject(
            Gaussians(*(t.float() for t in gaussians_ndc.tensors())),
            focal_length_px=focal_length_px,
            image_width=image_width,
            image_height=image_height,
        )


def unproject(
    gaussians_ndc: Gaussians, *, focal_length_px: float, image_width: int, image_height: int
) -> Gaussians:
    """Map Gaussians from the network's NDC space to metric camera space (OpenCV axes).

    The reference unprojects with inv(ndc @ K), K the intrinsics of the original w x h image
    (focal length f, principal point (w/2, h/2)) scaled to the square internal resolution S.
    Scaling K by S/w, S/h and mapping pixels to NDC by 2u/S - 1 gives x_ndc = (2f/w) x/z: the
    principal-point terms cancel and S drops out, leaving D = diag(w/2f, h/2f, 1) and no offset.
    Means become D μ and covariances D Σ D, factored again into rotation and scales.
    """
    if focal_length_px <= 0 or image_width <= 0 or image_height <= 0:
        raise ValueError(
            f"need a positive focal length and image size, got f={focal_length_px}, "
            f"{image_width}x{image_height}"
        )
    g = gaussians_ndc
    d = (image_width / (2 * focal_length_px), image_height / (2 * focal_length_px), 1.0)
    quaternions, scales = torch.empty_like(g.quaternions), torch.empty_like(g.scales)
    for rows in _chunks(len(g), g.means.device):
        covariance = _covariance(_components(g.quaternions[rows]), _components(g.scales[rows]))
        _decompose_into(_scale_sym3(covariance, d), quaternions[rows], scales[rows])
    return Gaussians(g.means * g.means.new_tensor(d), scales, quaternions, g.colors, g.opacities)


def rotations_from_quaternions(quaternions: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) rotation matrices from (N, 4) quaternions (w, x, y, z) of any nonzero length."""
    rows = _rotation(_components(quaternions))
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def covariances_from(quaternions: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) covariances R diag(scales²) Rᵀ from (N, 4) quaternions and (N, 3) scales."""
    xx, xy, xz, yy, yz, zz = _covariance(_components(quaternions), _components(scales))
    return torch.stack([xx, xy, xz, xy, yy, yz, xz, yz, zz], dim=-1).unflatten(-1, (3, 3))


def quaternions_from_rotations(rotations: torch.Tensor) -> torch.Tensor:
    """(N, 4) unit quaternions (w, x, y, z), w >= 0, from (N, 3, 3) rotation matrices."""
    rows = tuple(_components(row) for row in rotations.unbind(-2))
    return torch.stack(_quaternion(rows), dim=-1)


def decompose_covariances(covariances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor (N, 3, 3) symmetric covariances as R diag(scales²) Rᵀ.

    Returns (N, 4) unit quaternions (w >= 0) of proper rotations and (N, 3) scales, in no
    particular order. Computes in the input's dtype: float32 reconstructs the input to within
    a few 1e-6 of its largest entry. Zero or slightly negative eigenvalues (rank-deficient input,
    rounding) give the smallest normal float as variance, so scales and their logs stay finite.
    """
    n = covariances.shape[0]
    quaternions, scales = covariances.new_empty(n, 4), covariances.new_empty(n, 3)
    for rows in _chunks(n, covariances.device):
        c = covariances[rows]
        # Average mirrored entries so slightly asymmetric input is treated consistently.
        upper = (
            c[:, 0, 0],
            (c[:, 0, 1] + c[:, 1, 0]) / 2,
            (c[:, 0, 2] + c[:, 2, 0]) / 2,
            c[:, 1, 1],
            (c[:, 1, 2] + c[:, 2, 1]) / 2,
            c[:, 2, 2],
        )
        _decompose_into(tuple(t.contiguous() for t in upper), quaternions[rows], scales[rows])
    return quaternions, scales


def _chunks(n: int, device: torch.device) -> list[slice]:
    step = _CPU_CHUNK if device.type == "cpu" else max(n, 1)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _components(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(c.contiguous() for c in t.unbind(-1))


def _decompose_into(c: Sym3, quaternions: torch.Tensor, scales: torch.Tensor) -> None:
    eigenvalues, rotation = _symmetric_eigen(c)
    tiny = torch.finfo(scales.dtype).tiny
    # Column by column: on the CPU, 2-3x faster than torch.stack(..., out=...).
    for k, component in enumerate(_quaternion(rotation)):
        quaternions[:, k] = component
    for k, eigenvalue in enumerate(eigenvalues):
        scales[:, k] = eigenvalue.clamp_min(tiny).sqrt()


def _is_ge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1.0 where a >= b, else 0.0, in a's float dtype."""
    return torch.ge(a, b, out=torch.empty_like(a))


def _is_le(a: torch.Tensor, b: float) -> torch.Tensor:
    """1.0 where a <= b, else 0.0, in a's float dtype."""
    return torch.le(a, b, out=torch.empty_like(a))


def _blend(mask: torch.Tensor, yes: tuple[torch.Tensor, ...], no: tuple[torch.Tensor, ...]):
    """Componentwise yes where mask is 1.0, no where it is 0.0; exact for finite values, since
    torch.lerp computes start + w (end - start) for w < 1/2 and end - (1 - w)(end - start) else.
    """
    return tuple(torch.lerp(n, y, mask) for y, n in zip(yes, no))


def _cross(a: Vec3, b: Vec3) -> Vec3:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot(a: Vec3, b: Vec3) -> torch.Tensor:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _scaled(v: tuple[torch.Tensor, ...], factor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(c * factor for c in v)


def _sym_times(c: Sym3, v: Vec3) -> Vec3:
    xx, xy, xz, yy, yz, zz = c
    return (
        xx * v[0] + xy * v[1] + xz * v[2],
        xy * v[0] + yy * v[1] + yz * v[2],
        xz * v[0] + yz * v[1] + zz * v[2],
    )


def _scale_sym3(c: Sym3, d: tuple[float, float, float]) -> Sym3:
    """D C D for D = diag(d)."""
    xx, xy, xz, yy, yz, zz = c
    return (
        xx * (d[0] * d[0]),
        xy * (d[0] * d[1]),
        xz * (d[0] * d[2]),
        yy * (d[1] * d[1]),
        yz * (d[1] * d[2]),
        zz * (d[2] * d[2]),
    )


def _rotation(q: Quat) -> Mat3:
    w, x, y, z = q
    # Scaling the products by 2/|q|² normalizes without a square root; q = 0 gives I.
    s = 2 / (w * w + x * x + y * y + z * z).clamp_min(torch.finfo(w.dtype).tiny)
    sx, sy, sz = s * x, s * y, s * z
    xx, yy, zz = sx * x, sy * y, sz * z
    xy, xz, yz = sx * y, sx * z, sy * z
    wx, wy, wz = sx * w, sy * w, sz * w
    return (
        (1 - yy - zz, xy - wz, xz + wy),
        (xy + wz, 1 - xx - zz, yz - wx),
        (xz - wy, yz + wx, 1 - xx - yy),
    )


def _covariance(q: Quat, scales: Vec3) -> Sym3:
    """R diag(scales²) Rᵀ."""
    m = tuple(tuple(r_ik * s_k for r_ik, s_k in zip(row, scales)) for row in _rotation(q))
    return tuple(_dot(m[i], m[j]) for i, j in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)))


def _quaternion(r: Mat3) -> Quat:
    """Shepperd's method: of the four ways to read q off R, take the one that divides by the
    largest component (>= 1/2), so no component is the square root of a small, cancelling sum.
    """
    (r00, r01, r02), (r10, r11, r12), (r20, r21, r22) = r
    # Row k of this symmetric 4x4 matrix is 4 q_k (w, x, y, z); its diagonal is 4 (w², x², y², z²).
    kw = (1 + r00 + r11 + r22, r21 - r12, r02 - r20, r10 - r01)
    kx = (kw[1], 1 + r00 - r11 - r22, r01 + r10, r02 + r20)
    ky = (kw[2], kx[2], 1 - r00 + r11 - r22, r12 + r21)
    kz = (kw[3], kx[3], ky[3], 1 - r00 - r11 + r22)
    yz_max = torch.maximum(ky[2], kz[3])
    row = _blend(_is_ge(ky[2], kz[3]), ky, kz)
    row = _blend(_is_ge(kx[1], yz_max), kx, row)
    row = _blend(_is_ge(kw[0], torch.maximum(kx[1], yz_max)), kw, row)
    # Normalizing the row cancels 4 q_k; the sign of its w makes w >= 0.
    return _scaled(row, torch.copysign(torch.rsqrt(_dot(row[1:], row[1:]) + row[0] ** 2), row[0]))


def _symmetric_eigen(c: Sym3) -> tuple[Vec3, Mat3]:
    """Eigenvalues and eigenvectors (the columns of a proper rotation) of symmetric 3x3 matrices.

    Closed form after Eberly, "A Robust Eigensolver for 3x3 Symmetric Matrices": the eigenvalue
    farther from the other two comes from the trigonometric solution of the characteristic
    cubic, its eigenvector from the longest cross product of two rows of A - λI. In the plane
    orthogonal to it, one Jacobi rotation solves the remaining 2x2 problem exactly; unlike the
    cubic's roots, it stays accurate when the other two eigenvalues (nearly) coincide.
    """
    tiny = torch.finfo(c[0].dtype).tiny
    # Scale to max |entry| = 1 so squares and cubes neither overflow nor underflow.
    scale = c[0].abs()
    for t in c[1:]:
        scale = torch.maximum(scale, t.abs())
    scale = scale + _is_le(scale, 0.0)  # the zero matrix stays unscaled
    xx, xy, xz, yy, yz, zz = (t / scale for t in c)
    # B = A - mean(eigenvalues) I: entries on the scale of the eigenvalues' spread.
    mean = (xx + yy + zz) / 3
    b = (xx - mean, xy, xz, yy - mean, yz, zz - mean)
    bxx, byy, bzz = b[0], b[3], b[5]
    p = ((bxx * bxx + byy * byy + bzz * bzz + 2 * (xy * xy + xz * xz + yz * yz)) / 6).sqrt()
    det = bxx * (byy * bzz - yz * yz) - xy * (xy * bzz - yz * xz) + xz * (xy * yz - byy * xz)
    # Eigenvalues of B are 2p cos(θ + 2πk/3) with cos 3θ = det(B/p)/2. If cos 3θ >= 0 the
    # largest is the isolated one, else the smallest, which is the largest of -B negated.
    cos3 = det / (2 * p * p * p).clamp_min(tiny)
    lambda0 = torch.copysign(2 * p * torch.cos(torch.acos(cos3.abs().clamp(max=1)) / 3), cos3)

    v0 = _null_vector((bxx - lambda0, xy, xz), (xy, byy - lambda0, yz), (xz, yz, bzz - lambda0))
    u, w = _orthonormal_complement(v0)
    bu, bw = _sym_times(b, u), _sym_times(b, w)
    m00, m01, m11 = _dot(u, bu), _dot(w, bu), _dot(w, bw)
    # Jacobi rotation diagonalizing [[m00, m01], [m01, m11]]: t = tan φ is the smaller root of
    # t² + 2τt - 1 = 0, τ = (m11 - m00) / 2m01, written without dividing by m01. The sign of
    # d·m01 is that of τ (a signed zero when the product underflows).
    d = m11 - m00
    t_abs = 2 * m01.abs() / (d.abs() + torch.hypot(d, 2 * m01)).clamp_min(tiny)
    t = torch.copysign(t_abs, d * m01)
    cos = torch.rsqrt(1 + t * t)
    sin = t * cos
    v1 = tuple(cos * ui - sin * wi for ui, wi in zip(u, w))
    v2 = tuple(sin * ui + cos * wi for ui, wi in zip(u, w))
    eigenvalues = tuple((e + mean) * scale for e in (lambda0, m00 - t * m01, m11 + t * m01))
    # (v0, u, w) is right-handed and (v1, v2) is (u, w) rotated in their plane: det = +1.
    return eigenvalues, tuple((v0[i], v1[i], v2[i]) for i in range(3))


def _null_vector(r0: Vec3, r1: Vec3, r2: Vec3) -> Vec3:
    """Unit vector orthogonal to the rows of a rank-2 matrix: their longest cross product."""
    c01, c02, c12 = _cross(r0, r1), _cross(r0, r2), _cross(r1, r2)
    n01, n02, n12 = _dot(c01, c01), _dot(c02, c02), _dot(c12, c12)
    n_max = torch.maximum(n02, n12)
    best = _blend(_is_ge(n02, n12), c02, c12)
    best = _blend(_is_ge(n01, n_max), c01, best)
    n_max = torch.maximum(n01, n_max)
    # The longest cross product is about p² or more (p: the spread of the eigenvalues of the
    # scaled matrix). Below eps², A is a multiple of I to working precision and any unit
    # vector is an eigenvector: take x.
    eps2 = torch.finfo(n_max.dtype).eps ** 2
    isotropic = _is_le(n_max, eps2)
    x, y, z = _scaled(best, torch.rsqrt(n_max.clamp_min(eps2)) * (1 - isotropic))
    return x + isotropic, y, z


def _orthonormal_complement(v: Vec3) -> tuple[Vec3, Vec3]:
    """Unit u, w with (v, u, w) a right-handed orthonormal basis, for unit v."""
    x, y, z = v
    # u ⟂ v from the larger of |x|, |y| and z, so that |u|² >= 1/2 before normalizing.
    use_x = _is_ge(x.abs(), y.abs())
    use_y = 1 - use_x
    u = (-z * use_x, z * use_y, x * use_x - y * use_y)
    u = _scaled(u, torch.rsqrt(_dot(u, u)))
    return u, _cross(v, u)
