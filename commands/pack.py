"""Turn images (plus part label maps, COCO instances, keypoints) or point clouds and meshes into shards."""
from __future__ import annotations

from typing import List, Optional

import typer

from partkit.pack import pack

from partkit.errors import handler_for

from ._common import (
    NumShardsOption, OutputOption, OverwriteOption, ShardIndexOption, ShardSizeOption, SkipBadOption, cli_errors,
    make_output,
)


@cli_errors
def main(
    images: List[str] = typer.Argument(..., help="Image or 3D folders (searched recursively), globs or files "
                                                   "(.ply .obj .off .npz .npy ShapeNetPart .txt for point clouds)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Folder of part label PNGs matched by file stem."),
    label_names: Optional[str] = typer.Option(None, "--label-names", help="JSON file {\"id\": name} naming the "
                                              "ids of the --labels maps; recorded as part_names in each json."),
    coco: Optional[str] = typer.Option(None, "--coco", help="COCO JSON with instance masks (polygons or RLE), categories, keypoints."),
    coco_as: str = typer.Option("objects", "--coco-as", help="objects: --coco holds whole objects (gt_objects.json); "
                                "parts: one instance per part (PartImageNet) -> gt_parts.png, part_names in json, "
                                "the union of parts as gt_objects.json."),
    coco_objects: Optional[str] = typer.Option(None, "--coco-objects", help="With --coco-as parts: COCO JSON of whole "
                                               "objects for gt_objects.json instead of the union of parts."),
    category: Optional[str] = typer.Option(None, "--category", help="Object category recorded in every sample's json."),
    provenance: Optional[str] = typer.Option(None, "--provenance", help="Where the data comes from (recorded in json)."),
    points_per_shape: int = typer.Option(2048, "--points-per-shape",
                                         help="Surface points sampled from each mesh (.obj, .off, .ply with faces)."),
    output: OutputOption = "-",
    shard_size: ShardSizeOption = 1000,
    overwrite: OverwriteOption = False,
    skip_bad: SkipBadOption = False,
    num_shards: NumShardsOption = None,
    shard_index: ShardIndexOption = None,
):
    """Write one sample per image: the image, json metadata, gt_parts.png, gt_objects.json, gt_kpts.json.

    Point clouds and meshes give points.npy (unit sphere), normals.npy, colors.npy, gt_parts.npy and json.

    Example: partkit pack ../shared/data/cihp/images --labels ../shared/data/cihp/labels > cihp.tar

    Example: partkit pack ../shared/data/ccp/images --labels ../shared/data/ccp/labels --label-names ../shared/data/ccp/label_names.json

    Example: partkit pack ../shared/data/carparts/images --coco ../shared/data/carparts/annotations.json --coco-as parts
    """
    pack(images, labels=labels, label_names=label_names, coco=coco, coco_as=coco_as, coco_objects=coco_objects, category=category, provenance=provenance, handler=handler_for(skip_bad),
         points_per_shape=points_per_shape,
         output=make_output(output, shard_size, overwrite, [], num_shards, shard_index))
