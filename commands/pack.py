"""Turn images (plus part label maps, COCO instances, keypoints) or point clouds and meshes into shards."""
from __future__ import annotations

from typing import List, Optional

import typer

from partkit.datasets import DATASETS, pack_dataset
from partkit.errors import PartkitError, handler_for
from partkit.pack import pack

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
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Read IMAGES (one folder, the dataset's root) as "
                                          f"this benchmark's official layout: {', '.join(sorted(DATASETS))} "
                                          "(README, pack --dataset)."),
    split: str = typer.Option("all", "--split", help="With --dataset: train, val, test (as the dataset has them) "
                              "or all."),
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

    Example: partkit pack --dataset cub CUB_200_2011 --split test -o cub_test/
    """
    if dataset is not None:
        given = [name for name, value in (("--labels", labels), ("--label-names", label_names), ("--coco", coco),
                                          ("--coco-objects", coco_objects), ("--category", category))
                 if value is not None] + (["--coco-as"] if coco_as != "objects" else [])
        if given:
            raise PartkitError(f"--dataset reads the annotations from the dataset's own files; drop {', '.join(given)}")
        if len(images) != 1:
            raise PartkitError(f"--dataset {dataset} takes one ROOT folder, got {len(images)} inputs")
        pack_dataset(dataset, images[0], split=split, provenance=provenance, handler=handler_for(skip_bad),
                     output=make_output(output, shard_size, overwrite, [], num_shards, shard_index))
        return
    if split != "all":
        raise PartkitError("--split chooses a split of --dataset; pass --dataset NAME too")
    pack(images, labels=labels, label_names=label_names, coco=coco, coco_as=coco_as, coco_objects=coco_objects, category=category, provenance=provenance, handler=handler_for(skip_bad),
         points_per_shape=points_per_shape,
         output=make_output(output, shard_size, overwrite, [], num_shards, shard_index))
