# SoCo transfer to mmdetection 3.x: Mask R-CNN R50-FPN, 1x, with the layers SoCo pretrains:
# SyncBN in the backbone, the FPN (ConvModule conv + bn, no bias) and the heads, and the 4conv1fc
# box head (Shared4Conv1FCBBoxHead with a norm). The weights come from
#   soco-det export RUN --to mmdet -o soco_mmdet.pth
# and are read through `load_from` (backbone.*, neck.*, roi_head.bbox_head.shared_convs/shared_fcs);
# the RPN, the box predictor (fc_cls / fc_reg) and the mask head start from mmdet's initialisation.
# Train with e.g.  bash tools/dist_train.sh soco_mask-rcnn_r50_fpn_syncbn_1x_coco.py 8
_base_ = "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"

load_from = "soco_mmdet.pth"  # the exported file
norm_cfg = dict(type="SyncBN", requires_grad=True)

model = dict(
    # RGB input normalised like the pretraining (mmdet's default mean/std, converted to RGB).
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    backbone=dict(
        depth=50,
        frozen_stages=-1,  # nothing frozen (detectron2's FREEZE_AT 0)
        norm_cfg=norm_cfg,
        norm_eval=False,
        style="pytorch",  # stride in the 3x3 conv, like SoCo's torchvision ResNet
        init_cfg=None,
    ),  # no ImageNet download: load_from provides the weights
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type="Shared4Conv1FCBBoxHead", conv_out_channels=256, fc_out_channels=1024, norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg),
    ),
)

# SoCo's fine-tuning weight decay (2.5e-5, docs/method.md 7.1) with mmdet's 1x SGD settings.
optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.02, momentum=0.9, weight_decay=2.5e-5))
